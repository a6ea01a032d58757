"""`model.resize`: how a photo of any shape becomes the square the network takes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, photo
from PIL import Image

from imgclf.data.images import PAD_VALUE, load_pixels


def test_pad_keeps_the_whole_photo_at_its_aspect_ratio():
    # A 100x50 photo: a red left half, a blue right half.
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50] = (255, 0, 0)
    img[:, 50:] = (0, 0, 255)
    pixels = load_pixels(encode(Image.fromarray(img)), 80, "pad")
    assert pixels.shape == (80, 80, 3)
    # Scaled to 80x40, centred: 20 rows of padding above and below, in the pad colour.
    assert (pixels[:20] == PAD_VALUE).all() and (pixels[60:] == PAD_VALUE).all()
    band = pixels[20:60]
    assert not (band == PAD_VALUE).all(axis=-1).any()
    # Nothing is cut: both halves are there, side by side, each 40 px wide.
    assert (band[:, :38] == (255, 0, 0)).all() and (band[:, 42:] == (0, 0, 255)).all()


def test_crop_keeps_the_centre_and_stretch_keeps_everything_squeezed():
    img = np.zeros((50, 150, 3), np.uint8)
    img[:, :50] = (255, 0, 0)    # left third
    img[:, 50:100] = (0, 255, 0)  # centre third
    img[:, 100:] = (0, 0, 255)   # right third
    data = encode(Image.fromarray(img))
    crop = load_pixels(data, 30, "crop")
    assert (crop == (0, 255, 0)).all()  # the centre square only
    stretch = load_pixels(data, 30, "stretch")
    assert (stretch[:, :8] == (255, 0, 0)).all() and (stretch[:, 22:] == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_the_savedmodel_decoder_resizes_as_the_pipeline_does(mode):
    # The export's image-bytes signature decodes in TensorFlow; its twin of fit_to_square must
    # give the pipeline's pixels (up to resampling round-off), or served answers drift.
    import tensorflow as tf

    from imgclf.export.formats import _tf_fit_to_square

    data = encode(photo(120, 64, seed=5))
    expected = load_pixels(data, 75, mode).astype(np.float32)
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
    got = _tf_fit_to_square(decoded, 75, mode).numpy()
    assert got.shape == (75, 75, 3)
    assert np.abs(got - expected).mean() < 3.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L"])
def test_the_savedmodel_decoder_composites_transparency_on_white(mode):
    import tensorflow as tf

    from imgclf.export.formats import _tf_decode_rgb, _tf_fit_to_square

    rgba = np.asarray(photo(64, 64, seed=9).convert("RGBA")).copy()
    rgba[:32, :, 3] = 0       # top half fully transparent: white, as Pillow shows it
    rgba[32:48, :, 3] = 128   # a half-transparent band
    data = encode(Image.fromarray(rgba, "RGBA").convert(mode))
    expected = load_pixels(data, 64, "stretch").astype(np.float32)
    got = _tf_fit_to_square(_tf_decode_rgb(tf.constant(data)), 64, "stretch").numpy()
    assert np.abs(got - expected).max() <= 2.0
    if mode != "L":
        assert (got[:32] >= 254.5).all()
