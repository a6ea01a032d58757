"""Each deployable format as one callable: float pixels (n, s, s, 3), 0-255 -> probabilities.

The formats the package stage writes also answer the model's pooled features (the head's
input) from the same forward pass: `Forward`, what the selective scores read.

Keras (`.keras`), the export SavedModel, TFLite files (through LiteRT) and OpenVINO IR
(`model.xml` + `model.bin`, through the OpenVINO runtime); and the export folder's layout.
Each runner imports its engine itself, so a caller pays only for the format it uses: a TFLite-
or OpenVINO-served model needs no TensorFlow.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.images import DEFAULT_MAX_PIXELS

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 pixels (n, s, s, 3) -> probs (n, c)
# float32 pixels -> (probs (n, c), pooled features (n, d)), one forward pass
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
POOL_LAYER = "head_pool"  # model.network's name for the head's input

# The export folder (models/export): what is in it, by name.
SAVED_MODEL = "saved_model"
META = "export.json"
LABELS = "labels.txt"
CHUNK = 32  # images per call when a caller hands a runner more at once


OPENVINO_XML = "model.xml"  # an OpenVINO folder's graph; its weights beside it, model.bin


def tflite_name(variant: str) -> str:
    return f"model_{variant}.tflite"


def format_path(folder: Path, fmt: str) -> Path:
    """Where format `fmt` (saved_model, tflite_<variant>, openvino, openvino_int8) lies in an
    export folder."""
    if fmt == "saved_model" or fmt.startswith("openvino"):
        return folder / fmt
    return folder / tflite_name(fmt.removeprefix("tflite_"))


@dataclass
class Runner:
    """Float pixels (n, s, s, 3) -> probabilities, for one format."""

    name: str
    run: Predictor
    size_bytes: int
    both: Forward | None = None  # with the features, when the file has them
    precision: str | None = None  # what the engine computed in, where it chooses (OpenVINO)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


@dataclass
class LoadedModel:
    predict: Predictor
    classes: list[str]
    image_size: int
    resize: str
    source: str
    # Larger images are refused from their header, before decoding (prepare.max_pixels of
    # the training, or the pipeline default).
    max_pixels: int = DEFAULT_MAX_PIXELS


def in_chunks(predict, pixels: np.ndarray, size: int = CHUNK):
    """`predict` (a Predictor or a Forward) over `pixels` a chunk at a time: memory stays
    that of one chunk."""
    parts = [predict(pixels[i:i + size]) for i in range(0, len(pixels), size)]
    if parts and isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
    return np.concatenate(parts)


def mirrored_mean(predict):
    """Test-time augmentation: the mean of `predict` (a Predictor or a Forward) over each
    image and its mirror image."""

    def averaged(batch: np.ndarray):
        one, two = predict(batch), predict(np.ascontiguousarray(batch[:, :, ::-1, :]))
        if isinstance(one, tuple):
            return tuple((a + b) / 2.0 for a, b in zip(one, two, strict=True))
        return (one + two) / 2.0

    return averaged


def with_features(model):
    """`model` (the classifier) with a second output: its pooled features."""
    import keras

    return keras.Model(model.inputs, [model.outputs[0], model.get_layer(POOL_LAYER).output],
                       name=f"{model.name}_with_features")


def keras_forward(model, tta: bool = False) -> Forward:
    """Batch -> (probabilities, pooled features), one compiled call."""
    import tensorflow as tf

    two = with_features(model)
    forward = tf.function(lambda x: two(x, training=False), reduce_retracing=True)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, features = forward(batch)
        return probs.numpy(), features.numpy()

    return mirrored_mean(run) if tta else run


def keras_predictor(model, tta: bool = False) -> Predictor:
    """Batch -> probabilities; with tta, the mean over the image and its horizontal flip."""
    import tensorflow as tf

    # A compiled call of the model: predict()'s per-call machinery is most of a small
    # batch's cost on a CPU.
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(batch: np.ndarray) -> np.ndarray:
        return forward(batch).numpy()

    return mirrored_mean(predict) if tta else predict


def files_size(path: Path) -> int:
    """Bytes of a format's file, or of every file in its folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved_model_runner(path: Path, loaded=None) -> Runner:
    """`loaded`: the SavedModel at `path` if already loaded (a load restores every weight)."""
    import tensorflow as tf

    if loaded is None:
        loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["predict_pixels"]
    return Runner("saved_model", lambda x: fn(pixels=tf.constant(x))["probabilities"].numpy(),
                  files_size(path))


def saved_model_bytes_fn(loaded):
    """The image-bytes signature of a loaded export SavedModel."""
    import tensorflow as tf

    fn = loaded.signatures["serving_default"]
    return lambda blobs: fn(image_bytes=tf.constant(blobs))


def tflite_runner(path: Path, name: str) -> Runner:
    """A `.tflite` file run by LiteRT (ai-edge-litert): the same files as tf.lite, without
    TensorFlow (whose tf.lite.Interpreter is deprecated)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
    state = {"batch": None}
    inp = interpreter.get_input_details()[0]
    # The outputs by their names in the converted signature: a file's output order is the
    # converter's, not the signature's.
    named = ({name: d["index"] for name, d in
              interpreter.get_signature_runner().get_output_details().items()}
             if interpreter.get_signature_list() else {})
    probs_at = named.get("probabilities", interpreter.get_output_details()[0]["index"])
    features_at = named.get("features")

    def invoke(batch: np.ndarray) -> None:
        if state["batch"] != len(batch):
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            state["batch"] = len(batch)
        interpreter.set_tensor(inp["index"], batch.astype(np.float32))
        interpreter.invoke()

    def run(batch: np.ndarray) -> np.ndarray:
        invoke(batch)
        return interpreter.get_tensor(probs_at).copy()

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        invoke(batch)
        return interpreter.get_tensor(probs_at).copy(), interpreter.get_tensor(features_at).copy()

    return Runner(name, run, path.stat().st_size, both if features_at is not None else None)


def openvino_runner(folder: Path, name: str) -> Runner:
    """An OpenVINO folder (model.xml + model.bin) compiled for this machine's CPU. OpenVINO
    picks the precision itself (bf16 on CPUs with AVX-512 BF16 or AMX): the runner's name
    says which ran, and the format is gated on its agreement like a quantised one."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(Path(folder) / OPENVINO_XML), "CPU")
    request = compiled.create_infer_request()
    outputs = {o.get_any_name(): o for o in compiled.outputs}
    probs_at, features_at = outputs["probabilities"], outputs.get("features")

    def run(batch: np.ndarray) -> np.ndarray:
        return request.infer(batch.astype(np.float32))[probs_at].copy()

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = request.infer(batch.astype(np.float32))
        return out[probs_at].copy(), out[features_at].copy()

    size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    return Runner(name, run, size, both if features_at is not None else None,
                  compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def load_runner(fmt: str, path: Path) -> Runner:
    """The runner of a served format (tflite_<variant>, openvino, openvino_int8, saved_model)
    from its file or folder."""
    if fmt.startswith("tflite_"):
        return tflite_runner(path, fmt)
    if fmt.startswith("openvino"):
        return openvino_runner(path, fmt)
    if fmt == "saved_model":
        return saved_model_runner(path)
    raise ValueError(f"no runner for format {fmt!r}")


def throughput(runner, pixels: np.ndarray, rounds: int = 2) -> float:
    """Images/s of `runner` on `pixels` as one batch, after one warm-up call on it."""
    runner(pixels)
    start = time.perf_counter()
    for _ in range(rounds):
        runner(pixels)
    return round(rounds * len(pixels) / (time.perf_counter() - start), 2)


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
    return {"latency_ms_batch1": round(statistics.median(latencies) * 1000, 3),
            "images_per_s": throughput(runner, batch, rounds=3)}


def load_keras_file(path: Path, classes_path: Path, image_size: int | None,
                    resize: str, tta: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                    ) -> LoadedModel:
    import keras

    model = keras.models.load_model(path, safe_mode=True)
    size = image_size or int(model.input_shape[1])
    classes = json.loads(classes_path.read_text(encoding="utf-8"))
    return LoadedModel(keras_predictor(model, tta), classes, size, resize, str(path),
                       max_pixels)


def load_export(folder: Path, label: str | None = None) -> LoadedModel:
    """The export folder's recommended format as a LoadedModel (for `imgclf predict`),
    named `label (format)` in messages (default: the folder). The format is loaded into
    memory, so the folder may go away afterwards."""
    from imgclf.errors import UserError

    meta_path = folder / META
    if not meta_path.is_file():
        raise UserError(f"{folder} is not an export folder (no {META}): run the export stage")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    classes = (folder / LABELS).read_text(encoding="utf-8").splitlines()
    fmt = meta["recommended"]
    runner = load_runner(fmt, format_path(folder, fmt))
    return LoadedModel(runner, classes, int(meta["image_size"]), meta["resize"],
                       f"{label or folder} ({fmt})",
                       int(meta.get("max_pixels", DEFAULT_MAX_PIXELS)))
