"""Deployable formats of a trained Keras model, their parity with it, and their speed.

- SavedModel (`saved_model/`): signature `serving_default` takes encoded image bytes (JPEG,
  PNG, GIF, BMP) and returns `probabilities`, `class_name` and `confidence`, decoding and
  resizing inside, so a client sends files, not tensors; `predict_pixels` takes float pixels
  0-255 like the Keras model.
- TFLite: `model_float32.tflite`, `model_dynamic.tflite` (dynamic-range int8 weights),
  `model_float16.tflite`; all take float pixels 0-255.
- `labels.txt` (one class per line, model output order) and `export.json` (input size,
  resize mode, measured agreement, the format `imgclf predict` uses).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.images import PAD_VALUE
from stages.predicting import LoadedModel

SAVED_MODEL = "saved_model"
META = "export.json"
LABELS = "labels.txt"
QUANTISED_MIN_AGREEMENT = 0.98  # top-1 agreement with Keras for a quantised model to be used


def tflite_name(variant: str) -> str:
    return f"model_{variant}.tflite"


def _tf_fit_to_square(image, size: int, mode: str):
    """TensorFlow twin of images.fit_to_square (bilinear, antialiased) for the byte signature."""
    import tensorflow as tf

    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    image = tf.cast(image, tf.float32)
    if mode == "crop":
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2,
                                              (width - side) // 2, side, side)
    if mode == "pad":
        scale = size / tf.cast(tf.maximum(height, width), tf.float32)
        inner_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
        inner_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
        inner = tf.image.resize(image, (inner_h, inner_w), antialias=True)
        top, left = (size - inner_h) // 2, (size - inner_w) // 2
        padded = tf.pad(inner - PAD_VALUE[0],
                        [[top, size - inner_h - top], [left, size - inner_w - left], [0, 0]])
        return tf.reshape(padded + PAD_VALUE[0], (size, size, 3))
    return tf.reshape(tf.image.resize(image, (size, size), antialias=True), (size, size, 3))


def write_saved_model(model, classes: list[str], size: int, resize: str, path: Path) -> None:
    import tensorflow as tf

    class_names = tf.constant(classes)

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return _tf_fit_to_square(image, size, resize)

    def serve_bytes(image_bytes):
        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
        probs = model(pixels, training=False)
        top = tf.argmax(probs, axis=-1)
        return {"probabilities": probs, "class_name": tf.gather(class_names, top),
                "confidence": tf.reduce_max(probs, axis=-1)}

    archive = _pixels_archive(model, size)
    archive.add_endpoint("serving_default", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.write_out(str(path), verbose=False)


def _pixels_archive(model, size: int):
    """An export archive of `model` with the `predict_pixels` signature (float pixels 0-255
    in, `probabilities` out): what `write_tflite` converts and `saved_model_runner` calls."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("predict_pixels", lambda pixels: {"probabilities": model(
        pixels, training=False)}, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    return archive


def write_pixels_model(model, size: int, path: Path) -> None:
    """A SavedModel with only the `predict_pixels` signature (what TFLite converts)."""
    _pixels_archive(model, size).write_out(str(path), verbose=False)


def write_tflite(saved_model: Path, variants: dict[str, Path]) -> None:
    """Each TFLite variant ({variant: path}) from one converter: making a converter loads the
    SavedModel (~7 s for InceptionResNetV2); the files are byte-identical to fresh ones'."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model),
                                                         signature_keys=["predict_pixels"])
    for variant, path in variants.items():
        converter.optimizations = ([tf.lite.Optimize.DEFAULT]
                                   if variant in ("dynamic", "float16") else [])
        converter.target_spec.supported_types = [tf.float16] if variant == "float16" else []
        path.write_bytes(converter.convert())


# ------------------------------------------------------------------ running each format


@dataclass
class Runner:
    """Float pixels (n, s, s, 3) -> probabilities, for one format."""

    name: str
    run: object
    size_bytes: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved_model_runner(path: Path, loaded=None) -> Runner:
    """`loaded`: the SavedModel at `path` if already loaded (a load takes ~7 s)."""
    import tensorflow as tf

    if loaded is None:
        loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["predict_pixels"]
    return Runner("saved_model", lambda x: fn(pixels=tf.constant(x))["probabilities"].numpy(),
                  _dir_size(path))


def saved_model_bytes_fn(loaded):
    """The image-bytes signature of a loaded export SavedModel."""
    import tensorflow as tf

    fn = loaded.signatures["serving_default"]
    return lambda blobs: fn(image_bytes=tf.constant(blobs))


def tflite_runner(path: Path, name: str) -> Runner:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=os.cpu_count())
    state = {"batch": None}
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        if state["batch"] != len(batch):
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            state["batch"] = len(batch)
        interpreter.set_tensor(inp["index"], batch.astype(np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return Runner(name, run, path.stat().st_size)


def parity(reference: np.ndarray, probs: np.ndarray) -> dict:
    return {"top1_agreement": round(float((reference.argmax(1) == probs.argmax(1)).mean()), 6),
            "max_abs_diff": float(np.abs(reference - probs).max()) if len(probs) else 0.0}


def speed(runner, pixels: np.ndarray, batch_size: int, repeats: int = 5) -> dict:
    """Median latency at batch 1 and throughput at `batch_size`, after one warm-up call."""
    one = pixels[:1]
    runner(one)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(one)
        latencies.append(time.perf_counter() - start)
    batch = np.concatenate([pixels] * (-(-batch_size // len(pixels))))[:batch_size]
    runner(batch)
    start = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        runner(batch)
    elapsed = time.perf_counter() - start
    return {"latency_ms_batch1": round(statistics.median(latencies) * 1000, 3),
            "images_per_s": round(rounds * batch_size / elapsed, 2)}


SERVING_VARIANT = "dynamic"  # the serving copy: 4-6x Keras on CPU, weights int8 (exporting)
SERVING_SAMPLE = 256  # validation images the serving copy is checked on: +-1 point at 98%


def serving_copy(model, pixels: np.ndarray, folder: Path) -> tuple[Path | None, float]:
    """(the TFLite file to serve with, or None to serve Keras; its top-1 agreement with Keras
    on `pixels`). The quantised copy serves only when it keeps QUANTISED_MIN_AGREEMENT."""
    from stages.predicting import keras_predictor

    size = int(model.input_shape[1])
    write_pixels_model(model, size, folder / SAVED_MODEL)
    path = folder / tflite_name(SERVING_VARIANT)
    write_tflite(folder / SAVED_MODEL, {SERVING_VARIANT: path})
    keras_fn, lite = keras_predictor(model), tflite_runner(path, f"tflite_{SERVING_VARIANT}")
    reference = np.concatenate([keras_fn(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    probs = np.concatenate([lite(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    agreement = parity(reference, probs)["top1_agreement"]
    return (path if agreement >= QUANTISED_MIN_AGREEMENT else None), agreement


PREDICT_ARTIFACT = "export/predict"  # in the training run: what `imgclf predict` downloads


def format_path(folder: Path, fmt: str) -> Path:
    """Where format `fmt` (saved_model, tflite_<variant>) lies in an export folder."""
    return folder / (SAVED_MODEL if fmt == "saved_model"
                     else tflite_name(fmt.removeprefix("tflite_")))


def recommended_files(folder: Path) -> list[Path]:
    """The files a predictor needs from an export folder: metadata, labels, the fastest
    format that keeps the agreement gate."""
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    return [folder / META, folder / LABELS, format_path(folder, meta["recommended"])]


def load_export(folder: Path, label: str | None = None) -> LoadedModel:
    """The export folder's recommended format as a LoadedModel (for `imgclf predict`),
    named `label (format)` in messages (default: the folder). The format is loaded into
    memory, so the folder may go away afterwards."""
    from stages.errors import UserError

    meta_path = folder / META
    if not meta_path.is_file():
        raise UserError(f"{folder} is not an export folder (no {META}): run the export stage")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    classes = (folder / LABELS).read_text(encoding="utf-8").splitlines()
    fmt = meta["recommended"]
    if fmt == "saved_model":
        runner = saved_model_runner(format_path(folder, fmt))
    else:
        runner = tflite_runner(format_path(folder, fmt), fmt)
    return LoadedModel(runner, classes, int(meta["image_size"]), meta["resize"],
                       f"{label or folder} ({fmt})", int(meta.get("max_pixels", 64_000_000)))
