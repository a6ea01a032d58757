"""Write the offline demo dataset: scikit-learn's bundled handwritten digits as photos.

Real data shipped inside the scikit-learn wheel, so `make demo` needs no network: 1,797
8x8 grey digits, upscaled to 96 px RGB PNGs, one folder per digit. With `--ood FOLDER`, also
images that are no digit at all, for `evaluate.ood_dir`: crops of scikit-learn's two sample
photos (a temple, a flower), photo-like colour scenes, stripes and checkerboards, noise.

    imgclf demo-data data/raw [--size 96] [--ood data/ood]
"""

from __future__ import annotations

import argparse
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf import io


def digit_images(size: int = 96) -> list[tuple[str, int, Image.Image]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        # Values are 0..16 ink; photos are dark ink on light paper, so invert.
        grey = (255 - pixels / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        out.append((str(int(target)), index, img.convert("RGB")))
    return out


def write_digits(raw_dir: Path, size: int = 96, limit_per_class: int | None = None) -> int:
    written: dict[str, int] = {}
    for label, index, img in digit_images(size):
        if limit_per_class is not None and written.get(label, 0) >= limit_per_class:
            continue
        buffer = BytesIO()
        img.save(buffer, format="PNG")
        io.write_bytes(raw_dir / label / f"digit_{index:04d}.png", buffer.getvalue())
        written[label] = written.get(label, 0) + 1
    return sum(written.values())


def not_digits(count: int = 60, size: int = 96, seed: int = 0) -> list[Image.Image]:
    """`count` RGB images of none of the digit classes, in four kinds taken in turn."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # a square crop of a real photo
            photo = photos[i // 4 % len(photos)]
            side = int(rng.integers(size, min(photo.shape[:2])))
            top = int(rng.integers(0, photo.shape[0] - side))
            left = int(rng.integers(0, photo.shape[1] - side))
            img = Image.fromarray(photo[top:top + side, left:left + side])
        elif kind == 1:  # smooth colour shapes with sensor-like noise
            coarse = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3),
                                  dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((size, size),
                                                               Image.Resampling.BICUBIC), int)
            img = Image.fromarray(np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255)
                                  .astype(np.uint8))
        elif kind == 2:  # stripes or a checkerboard in two colours
            period = int(rng.integers(4, 24))
            angle = rng.uniform(0, np.pi)
            wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period) > 0
            if rng.uniform() < 0.5:
                wave ^= (y // period + x // period) % 2 == 0
            a, b = rng.integers(0, 256, (2, 3))
            img = Image.fromarray(np.where(wave[..., None], a, b).astype(np.uint8))
        else:  # noise
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        out.append(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return out


def write_not_digits(folder: Path, count: int = 60, size: int = 96) -> int:
    for i, img in enumerate(not_digits(count, size)):
        buffer = BytesIO()
        img.save(buffer, format="PNG")
        io.write_bytes(folder / f"not_a_digit_{i:03d}.png", buffer.getvalue())
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("--size", type=int, default=96, help="side in pixels (default 96)")
    parser.add_argument("--ood", type=Path, metavar="FOLDER",
                        help="also write images of no digit there (for evaluate.ood_dir)")
    args = parser.parse_args(argv)
    if args.ood is not None and not (args.ood.exists() and any(args.ood.iterdir())):
        count = write_not_digits(args.ood, size=args.size)
        print(f"wrote {count} images of no digit (photos, scenes, patterns, noise) to "
              f"{args.ood}")
    if args.raw_dir.exists() and any(p for p in args.raw_dir.iterdir()
                                     if not p.name.startswith(".")):
        print(f"{args.raw_dir} is not empty: keeping your images, not writing the demo digits")
        return
    count = write_digits(args.raw_dir, args.size)
    print(f"wrote {count} demo images (scikit-learn digits, {args.size} px) to {args.raw_dir}")


if __name__ == "__main__":
    main()
