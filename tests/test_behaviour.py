"""Behavioural tests of a trained model (in the spirit of Made-With-ML's `tests/model`): on
real images (scikit-learn's digits, as `make demo` uses them), its answers do not change
with what should not change them, and its accuracy stays above a floor."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import ROOT, run_module, set_params
from PIL import Image

# Below what these settings reach (random init, 75 px, the head alone, 40 digits per class,
# 60 test images: see the closing note of the issue that set it), with room for a few test
# images more or less: a regression, not noise, crosses it.
ACCURACY_FLOOR = 0.6
DECIDED = 0.2  # the top-1 leads its runner-up by this much: not a close call
_LOADED: dict = {}


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory):
    from imgclf.data.demo import write_digits

    root = tmp_path_factory.mktemp("digits")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    write_digits(root / "data/raw", limit_per_class=40)
    set_params(root, model__image_size=75, model__weights=None, augment__flip="none",
               train__head_lr=0.01, train__head_epochs=15, train__early_stopping_patience=5,
               train__finetune_epochs=0, train__batch_size=32)
    for module in ("stages.prepare", "stages.features", "stages.train"):
        result = run_module(module, root)
        assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
    return root


def _answers(root, blobs: list[bytes]) -> np.ndarray:
    from imgclf.data.images import load_pixels
    from imgclf.serving.runners import load_keras_file

    if root not in _LOADED:  # one load per project: a Keras load is most of a call's cost
        _LOADED[root] = load_keras_file(root / "models/model.keras",
                                        root / "data/prepared/classes.json", None, "crop")
    model = _LOADED[root]
    pixels = np.stack([load_pixels(b, model.image_size, model.resize) for b in blobs])
    return model.predict(pixels.astype(np.float32))


def _test_images(root) -> tuple[list[Image.Image], np.ndarray]:
    import pandas as pd

    test = pd.read_csv(root / "data/prepared/test.csv")
    classes = json.loads((root / "data/prepared/classes.json").read_text())
    images = [Image.open(root / p).convert("RGB") for p in test["path"]]
    return images, np.array([classes.index(str(c)) for c in test["label"]])


def _encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _upright_stored_turned(image: Image.Image) -> bytes:
    """The image stored turned a quarter anticlockwise, with the EXIF orientation (6) that
    says to turn it back: what a phone held sideways writes."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(image.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


@pytest.mark.slow
def test_accuracy_on_the_digits_stays_above_its_floor(digits_project):
    images, labels = _test_images(digits_project)
    probs = _answers(digits_project, [_encoded(i) for i in images])
    accuracy = float((probs.argmax(1) == labels).mean())
    assert accuracy >= ACCURACY_FLOOR, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("change", ["jpeg_quality_90", "resized_smaller", "exif_orientation"])
def test_top1_is_invariant_to_what_should_not_change_it(digits_project, change):
    images, _ = _test_images(digits_project)
    original = _answers(digits_project, [_encoded(i) for i in images])
    top2 = np.sort(original, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= DECIDED
    assert decided.sum() >= len(images) // 2, decided.sum()
    changed = {
        "jpeg_quality_90": lambda i: _encoded(i, "JPEG", quality=90),
        "resized_smaller": lambda i: _encoded(i.resize((88, 88), Image.Resampling.BICUBIC)),
        "exif_orientation": _upright_stored_turned,
    }[change]
    after = _answers(digits_project, [changed(i) for i in images])
    same = original.argmax(1) == after.argmax(1)
    assert same[decided].mean() >= 0.97, (change, same[decided].mean())

