"""Write the offline demo dataset: scikit-learn's bundled handwritten digits as photos.

Real data shipped inside the scikit-learn wheel, so `make demo` needs no network: 1,797
8x8 grey digits, upscaled to 96 px RGB PNGs, one folder per digit.

    imgclf demo-data data/raw [--size 96]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("--size", type=int, default=96, help="side in pixels (default 96)")
    args = parser.parse_args(argv)
    if args.raw_dir.exists() and any(p for p in args.raw_dir.iterdir()
                                     if not p.name.startswith(".")):
        print(f"{args.raw_dir} is not empty: keeping your images, not writing the demo digits")
        return
    count = write_digits(args.raw_dir, args.size)
    print(f"wrote {count} demo images (scikit-learn digits, {args.size} px) to {args.raw_dir}")


if __name__ == "__main__":
    main()
