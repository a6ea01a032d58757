"""The Keras test probabilities register computes once: evaluate and export read them only
for the model and test files they were computed for."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgclf.errors import UserError
from imgclf.export import reference


def test_stored_keras_probabilities_are_refused_for_another_model_or_test_split(tmp_path):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"img_{i}.png"))
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(files[-1])

    def forward(pixels):  # a stand-in model: each image's mean brightness, as two classes
        mean = pixels.mean(axis=(1, 2, 3)) / 255.0
        return (np.stack([mean, 1.0 - mean], axis=1).astype(np.float32),
                pixels.mean(axis=(1, 2)))  # and per-channel means as its "features"

    path = tmp_path / "keras_test_probs.npz"
    written = reference.write(forward, files, 32, "crop", 10**8, "weights-a", path)
    assert written.shape == (3, 2)
    np.testing.assert_array_equal(reference.read(files, "weights-a", path), written)
    probs, features = reference.read(files, "weights-a", path, with_features=True)
    np.testing.assert_array_equal(probs, written)
    assert features.shape == (3, 3) and features[2, 0] == pytest.approx(120.0)
    with pytest.raises(UserError, match="another model or test split"):
        reference.read(files, "weights-b", path)  # retrained since
    with pytest.raises(UserError, match="another model or test split"):
        reference.read(files[:2], "weights-a", path)  # prepared again
    assert not list(tmp_path.glob(".tmp-*"))  # written in one rename
