"""The SavedModel package writes, and the OpenVINO copy of the same traced network."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_the_saved_model_traces_the_network_once_and_both_signatures_answer_keras(
        tiny_classifier, tmp_path, monkeypatch):
    import tensorflow as tf

    from imgclf.export import formats

    model = tiny_classifier
    traces = []
    two_outputs = formats.with_features

    def counted(network):
        inner = two_outputs(network)

        def call(*args, **kwargs):
            traces.append(1)  # Python runs here only while TensorFlow traces
            return inner(*args, **kwargs)
        return call

    monkeypatch.setattr(formats, "with_features", counted)
    forward = formats.write_saved_model(model, ["a", "b"], 8, "pad", tmp_path / "saved_model")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
    probs, _features = forward(pixels)
    # Written, run and called by the image-bytes signature: one trace of the network (each
    # more is the whole network traced again while saving, and stored again).
    assert len(traces) == 1

    expected = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    by_pixels = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(by_pixels["probabilities"].numpy(), expected, atol=1e-5)
    by_bytes = loaded.signatures["serving_default"](
        image_bytes=tf.constant([_png(p) for p in pixels]))
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(), expected, atol=1e-5)
    assert [c.decode() for c in by_bytes["class_name"].numpy()] == [
        "ab"[i] for i in expected.argmax(1)]


def test_openvino_reads_the_traced_network_the_same_through_the_variables_index(
        tiny_classifier, tmp_path):
    import openvino as ov

    from imgclf.export import formats

    traced = formats.traced_pixels(tiny_classifier)
    as_openvino_reads = ov.convert_model(traced)
    with formats._variables_indexed():
        indexed = ov.convert_model(traced)
    # The same graph, with the same weights in it, and OpenVINO's own reader put back.
    for name, converted in (("scan", as_openvino_reads), ("index", indexed)):
        ov.save_model(converted, str(tmp_path / name / "model.xml"), compress_to_fp16=False)
    assert ((tmp_path / "index/model.bin").read_bytes()
            == (tmp_path / "scan/model.bin").read_bytes())

    # Node names count up across conversions in one process: all but those the same.
    def graph(name: str) -> str:
        return re.sub(r' name="[^"]*"', "", (tmp_path / name / "model.xml").read_text())

    assert graph("index") == graph("scan")
    from openvino.frontend.tensorflow.node_decoder import TFGraphNodeDecoder

    assert TFGraphNodeDecoder.__dict__["get_variable"].__func__.__module__ == (
        "openvino.frontend.tensorflow.node_decoder")


def test_the_saved_model_is_checked_as_traced_and_the_graph_optimiser_is_put_back(
        tiny_classifier, tmp_path):
    import tensorflow as tf

    from imgclf.export import formats

    formats.write_saved_model(tiny_classifier, ["a", "b"], 8, "pad", tmp_path / "saved_model")
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    before = tf.config.optimizer.get_experimental_options()
    with pytest.raises(RuntimeError, match="the check failed"), formats.graph_optimizer_off():
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"]
        # What package's check reads: Keras's answers, the graph run as traced.
        loaded = formats.load_saved_model(tmp_path / "saved_model")
        probs = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))["probabilities"]
        np.testing.assert_allclose(probs.numpy(), tiny_classifier.predict(pixels, verbose=0),
                                   atol=1e-5)
        raise RuntimeError("the check failed")
    # Even after a failed check: every TensorFlow function called later is optimised.
    assert tf.config.optimizer.get_experimental_options() == before
