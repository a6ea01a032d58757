"""Temperature scaling: calibrated probabilities, the same answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from imgclf import metrics
from imgclf.model.calibration import bake_temperature, fit_temperature


def test_fitted_temperature_cools_an_overconfident_model():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 5)) * 5  # confident...
    labels = np.array([np.argmax(z + rng.normal(size=5) * 4) for z in logits])  # ...often wrong
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    temperature = fit_temperature(probs, labels)
    assert temperature > 1.2
    calibrated = metrics.with_temperature(probs, temperature)
    assert metrics.nll(calibrated, labels) < metrics.nll(probs, labels) - 0.05
    assert metrics.expected_calibration_error(calibrated, labels) < \
        metrics.expected_calibration_error(probs, labels)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()


def test_expected_calibration_error_of_known_bins():
    # Two predictions at 0.9 confidence, one right: |0.5 - 0.9| on 2 of 4; two at 0.6, both
    # right: |1 - 0.6| on 2 of 4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    assert np.isclose(metrics.expected_calibration_error(probs, labels), 0.5 * 0.4 + 0.5 * 0.4)


def test_trained_model_is_calibrated_without_changing_an_answer(trained_project):
    """The shipped model.keras carries the temperature: against the same network without it,
    every validation top-1 answer is the same and the validation log loss is not higher."""
    import keras

    from imgclf.data.images import load_pixels

    train = json.loads((trained_project / "reports/train.json").read_text())
    temperature = train["temperature"]
    assert train["calibration"]["val_log_loss_after"] <= train["calibration"]["val_log_loss_before"]
    val = pd.read_csv(trained_project / "data/prepared/val.csv", dtype={"label": str})
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    labels = np.array([classes.index(c) for c in val["label"]])
    pixels = np.stack([load_pixels(str(trained_project / p), 75, "crop")
                       for p in val["path"]]).astype("float32")
    model = keras.models.load_model(trained_project / "models/model.keras", safe_mode=True)
    calibrated = model.predict(pixels, verbose=0)
    bake_temperature(model, 1 / temperature)  # the network as trained, before calibration
    raw = model.predict(pixels, verbose=0)
    assert (calibrated.argmax(1) == raw.argmax(1)).all()
    assert metrics.nll(calibrated, labels) <= metrics.nll(raw, labels) + 1e-6
    assert np.isclose(metrics.nll(calibrated, labels),
                      train["calibration"]["val_log_loss_after"], atol=1e-4)
