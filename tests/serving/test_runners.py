"""Runners and file collection as `imgclf predict` and evaluate use them."""

from __future__ import annotations

import os

import keras
import numpy as np
from conftest import encode, photo, write

from imgclf.serving.batches import collect_images
from imgclf.serving.runners import keras_predictor


def left_heavy_model():
    """Probabilities that depend on where the bright pixels are: left half vs right half."""
    inputs = keras.Input((8, 8, 3))
    halves = [keras.layers.GlobalAveragePooling2D()(keras.layers.Cropping2D(crop)(inputs))
              for crop in (((0, 0), (0, 4)), ((0, 0), (4, 0)))]
    logits = keras.layers.Concatenate()(
        [keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(h) for h in halves])
    return keras.Model(inputs, keras.layers.Softmax()(logits / 100.0))


def test_tta_averages_the_image_and_its_mirror():
    model = left_heavy_model()
    batch = np.zeros((2, 8, 8, 3), np.float32)
    batch[0, :, :4] = 255  # bright left
    batch[1, :, 4:] = 200  # bright right
    plain = keras_predictor(model)(batch)
    mirrored = keras_predictor(model)(np.ascontiguousarray(batch[:, :, ::-1]))
    tta = keras_predictor(model, tta=True)(batch)
    assert plain[0, 0] > 0.9 and plain[1, 1] > 0.9  # the model does tell left from right
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tta, plain)


def test_folders_given_as_users_type_them(tmp_path, monkeypatch):
    png = encode(photo(40, 40, seed=1))
    outside = tmp_path / "photos"
    write(outside / "a.png", png)
    write(outside / "sub" / "b.jpg", png)
    write(outside / ".hidden.png", png)           # hidden file inside: skipped
    write(outside / ".thumbs" / "c.png", png)     # hidden folder inside: skipped
    write(outside / "notes.txt", b"hello")
    cached = tmp_path / ".cache" / "shots"        # a dot-folder *above* the one given
    write(cached / "d.png", png)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)

    files, missing = collect_images(["../photos", str(cached), "../nowhere"])
    assert files == [os.path.join("../photos", "a.png"),
                     os.path.join("../photos", "sub", "b.jpg"), str(cached / "d.png")]
    assert missing == ["../nowhere"]
