"""Odd-but-valid images decode to upright RGB; bad ones are rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, photo, write
from PIL import Image

from imgclf.data.images import ImageRejected, decode_rgb, inspect_and_decode, inspect_image

LIMIT = 64_000_000


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(decode_rgb(data, LIMIT))


def test_exif_rotated_jpeg_is_turned_upright():
    img = photo(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = decode_rgb(encode(img, "JPEG", exif=exif.tobytes()), LIMIT)
    assert out.size == (40, 80)


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK"])
def test_non_rgb_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    src = photo(32, 32).convert(mode)
    out = decode_rgb(encode(src, fmt), LIMIT)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    arr = rgb_of(encode(rgba, "PNG"))
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (0, 0, 255)
    la = Image.new("LA", (10, 10), (0, 0))
    assert tuple(rgb_of(encode(la, "PNG"))[3, 3]) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    img = Image.fromarray(values)  # uint16 -> mode I;16
    arr = rgb_of(encode(img, "PNG"))
    assert list(arr[0, :, 0]) == [0, 64, 128, 255]


def test_progressive_jpeg_bmp_webp_and_first_gif_frame():
    img = photo(40, 30)
    for fmt, kwargs in (("JPEG", {"progressive": True}), ("BMP", {}), ("WEBP", {})):
        assert decode_rgb(encode(img, fmt, **kwargs), LIMIT).size == (40, 30)
    frames = [Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    arr = rgb_of(gif)
    assert arr[10, 10, 0] > 200 and arr[10, 10, 2] < 50  # red: the first frame


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"this is a text file, not a photo" * 10, "not_an_image"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, data, reason):
    path = write(tmp_path / "x.jpg", data)
    with pytest.raises(ImageRejected) as err:
        inspect_image(path, LIMIT, 1)
    assert err.value.reason == reason


@pytest.mark.parametrize("grey", [False, True])
def test_truncated_jpeg_is_rejected(tmp_path, grey):
    """Also when prepare decodes a colour JPEG straight to greyscale (for the hash)."""
    data = encode(photo(200, 200), "JPEG", quality=95)
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageRejected) as err:
        inspect_and_decode(path, LIMIT, 1, grey=grey)
    assert err.value.reason == "corrupt"
    whole = write(tmp_path / "whole.jpg", data)
    assert inspect_and_decode(whole, LIMIT, 1, grey=grey)[1].mode == ("L" if grey else "RGB")


def test_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", encode(photo(200, 100)))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageRejected) as err:
        inspect_image(path, max_pixels=19_999, min_side=1)
    assert err.value.reason == "too_large"


def test_too_small_is_rejected(tmp_path):
    path = write(tmp_path / "tiny.png", encode(photo(40, 10)))
    with pytest.raises(ImageRejected) as err:
        inspect_image(path, LIMIT, min_side=32)
    assert err.value.reason == "too_small"
    assert inspect_image(path, LIMIT, min_side=10).width == 40
