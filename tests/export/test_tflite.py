"""TFLite copies: converted from the SavedModel package wrote, giving its answers."""

from __future__ import annotations

import numpy as np


def test_tflite_is_converted_from_the_saved_model_folder_without_loading_it_in_python(
        tiny_classifier, tmp_path, monkeypatch):
    from tensorflow.python.saved_model import load as tf_load

    from imgclf.export.formats import write_saved_model, write_tflite
    from imgclf.serving.runners import load_runner

    model = tiny_classifier
    write_saved_model(model, ["a", "b"], 8, "pad", tmp_path / "saved_model")

    def loads_again(*_args, **_kwargs):
        raise AssertionError("the SavedModel was loaded (or saved again and loaded)")

    # Every Python load of a SavedModel goes through load_partial: the converter's own
    # load (for the debug info alone) and the temporary copy the public converter API saves
    # and loads back.
    monkeypatch.setattr(tf_load, "load_partial", loads_again)
    out = tmp_path / "model_float32.tflite"
    write_tflite(tmp_path / "saved_model", {"float32": out})

    pixels = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3)).astype(np.float32)
    probs = load_runner("tflite_float32", out)(pixels)
    np.testing.assert_allclose(probs, model.predict(pixels, verbose=0), atol=1e-5)
