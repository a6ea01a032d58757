"""Reading one image file the way every stage reads it.

`prepare` uses `inspect_and_decode` to validate files; the input pipeline uses `decode_rgb` so
training, evaluation and prediction see exactly the pixels that `prepare` approved:
EXIF rotation applied, first frame of animations, transparency over white, 16-bit scaled
(not clipped) to 8-bit, every mode converted to RGB.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own limit (prepare.max_pixels) before decoding; Pillow's own bomb check
# would raise at a different, hidden threshold.
Image.MAX_IMAGE_PIXELS = None
# The default of prepare.max_pixels: 64 Mpx of RGB is 3 bytes a pixel in memory, decoded.
DEFAULT_MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Files that live in photo folders but are not photos: ignored without a report line.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
IGNORED_EXTENSIONS = frozenset({".txt", ".csv", ".json", ".md", ".ini", ".db", ".dvc", ".yaml"})


class ImageRejected(Exception):
    """A file that is not a usable image; `reason` is a short stable code for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int
    height: int
    format: str
    mode: str


def is_ignored(path: Path) -> bool:
    name = path.name
    return (
        name.startswith(".")
        or name.lower() in IGNORED_NAMES
        or path.suffix.lower() in IGNORED_EXTENSIONS
    )


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale to 8 bits; Pillow's convert("L") would clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels over white, as a viewer shows them; black would be arbitrary.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a format Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageRejected("not_an_image", str(err)) from None
    width, height = img.size
    # Checked from the header, before any pixel is decoded: a decompression bomb never
    # gets the chance to allocate its gigabytes.
    if width * height > max_pixels:
        raise ImageRejected(
            "too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
        )
    return img


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `data` into an upright RGB image, or raise ImageRejected."""
    return _decode_opened(_open(data, max_pixels))


def _decode_opened(img: Image.Image, rgb: bool = True) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            # In place: the image is ours, and a copy of every photo is work for nothing.
            img = ImageOps.exif_transpose(img, in_place=True) or img
            return _to_rgb(img) if rgb else img
    except ImageRejected:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ImageRejected("corrupt", str(err) or type(err).__name__) from None


def inspect_image(path: Path, max_pixels: int, min_side: int) -> ImageInfo:
    """Read, hash and fully decode one file; raise ImageRejected with the reason if unusable."""
    return inspect_and_decode(path, max_pixels, min_side)[0]


def inspect_and_decode(path: Path, max_pixels: int, min_side: int,
                       grey: bool = False) -> tuple[ImageInfo, Image.Image]:
    """`inspect_image`, also returning the decoded image: RGB, or with `grey` greyscale where
    the file can decode straight to it (what `prepare`'s perceptual hash reads).

    `prepare` decodes a file to prove that it decodes (training decodes it again, at the
    model's size). A colour JPEG decoded to greyscale still has every coefficient of every
    channel read (a truncated or corrupt file fails just as in colour) but skips the colour
    channels' inverse DCT and the colour conversion, which pays for the hash (`make bench`:
    prepare_near_duplicate_gate_slowdown). JPEG's luma is the grey of RGB->L, so the hash
    stays that of the colour image, within a bit or two."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageRejected("unreadable", err.strerror or str(err)) from None
    digest = hashlib.sha256(data).hexdigest()
    img = _open(data, max_pixels)
    fmt = img.format or "?"
    mode = img.mode
    if grey and fmt == "JPEG":
        img.draft("L", img.size)  # full size; only colour JPEGs switch to greyscale
    decoded = _decode_opened(img, rgb=not (grey and img.mode == "L"))
    width, height = decoded.size
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}, a side below min_side {min_side}")
    return ImageInfo(sha256=digest, width=width, height=height, format=fmt, mode=mode), decoded


# Pad colour for `resize: pad`: mid-grey maps to ~0 after InceptionResNetV2's [-1, 1] scaling,
# the least informative value for the network.
PAD_VALUE = (128, 128, 128)


def fit_to_square(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize an RGB image to size x size.

    stretch: ignore the aspect ratio. crop: centre-crop the largest square, then resize
    (what Keras's `smart_resize` and ImageNet evaluation do). pad: fit the whole image,
    letterboxed with PAD_VALUE.
    """
    width, height = img.size
    if mode == "crop" and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif mode == "pad" and width != height:
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), PAD_VALUE)
        canvas.paste(img.resize(inner, Image.Resampling.BILINEAR),
                     ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def load_pixels(source: str | Path | bytes, size: int, mode: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file (path or bytes) -> uint8 array (size, size, 3), with prepare's decode rules."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return np.asarray(fit_to_square(decode_rgb(data, max_pixels), size, mode), dtype=np.uint8)
