"""Deployable formats of a trained Keras model: writing them, and measuring their speed.

- SavedModel (`saved_model/`): signature `serving_default` takes encoded image bytes (JPEG,
  PNG, GIF, BMP) and returns `probabilities`, `class_name`, `confidence` and `features`,
  decoding and resizing inside, so a client sends files, not tensors; `predict_pixels` takes
  float pixels 0-255 like the Keras model and returns `probabilities` and `features` (the
  pooled features the selective scores read, from the same forward pass).
- TFLite, the variants `export.tflite` names: `model_dynamic.tflite` (dynamic-range int8
  weights; the default: what the registered version serves with), `model_float32.tflite`,
  `model_float16.tflite`, `model_int8.tflite`; all take float pixels 0-255 and answer the
  two outputs of `predict_pixels`.
- `labels.txt` (one class per line, model output order) and `export.json` (input size,
  resize mode, each format's agreement with Keras, the format `imgclf predict` uses).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from imgclf import io, paths
from imgclf.data.images import PAD_VALUE
from imgclf.errors import UserError
from imgclf.metrics import (
    FEATURES_MIN_COSINE,
    QUANTISED_MIN_AGREEMENT,
    decided,
    min_cosine,
    parity,
    stands_in,
)
from imgclf.params import Params
from imgclf.serving.batches import iter_batches
from imgclf.serving.runners import (
    LABELS,
    META,
    OPENVINO_XML,
    SAVED_MODEL,
    Runner,
    files_size,
    format_path,
    load_runner,
    saved_model_bytes_fn,
    saved_model_runner,
    speed,
    tflite_name,
    with_features,
)

# SavedModel and TFLite float32 compute what Keras computes: they may differ by round-off only.
FLOAT_TOLERANCE = 1e-4
# The image-bytes signature decodes in TensorFlow, not Pillow: resampling round-off may move a
# close call, nothing more. Agreement here, and a quantised format's, is counted over the
# images that are no close call for Keras (`metrics.decided`): on a random-init model every
# answer is a near-tie, and counting them would fail the stage and serve Keras.
BYTES_MIN_AGREEMENT = 0.99


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


def _tf_decode_rgb(data):
    """TensorFlow twin of images.decode_rgb, as far as TensorFlow's decoders go: grey to RGB,
    transparency composited over white (not dropped), the first frame of a GIF. It cannot
    apply EXIF orientation nor read WebP or TIFF (README: Export)."""
    import tensorflow as tf

    image = tf.cast(tf.io.decode_image(data, expand_animations=False), tf.float32)
    channels = tf.shape(image)[-1]  # 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA
    color = tf.cond(channels >= 3, lambda: image[..., :3],
                    lambda: tf.tile(image[..., :1], [1, 1, 3]))
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: image[..., -1:] / 255.0,
                    lambda: tf.ones_like(image[..., :1]))
    return color * alpha + 255.0 * (1.0 - alpha)


def traced_pixels(model):
    """`model` traced as the pixels signature: float pixels 0-255 (`pixels`, any batch) in,
    `probabilities` and the pooled `features` out, from one forward pass."""
    import tensorflow as tf

    two = with_features(model)
    size = model.input_shape[1]

    def forward(pixels):
        probs, features = two(pixels, training=False)
        return {"probabilities": probs, "features": features}

    return tf.function(forward, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]).get_concrete_function()


def write_saved_model(model, classes: list[str], size: int, resize: str, path: Path,
                      traced=None):
    """The SavedModel of `model` at `path`: `serving_default` (image bytes in) and
    `predict_pixels` (float pixels 0-255 in, what `write_tflite` converts), both calling
    `traced` (`traced_pixels(model)`, traced here when not given). Returns the pixels
    signature's traced function as a Forward (batch -> probabilities, pooled features): the
    Keras model's own graph, already traced for the export, so a caller that also runs the
    model in this process pays no second trace."""
    import tensorflow as tf

    class_names = tf.constant(classes)
    # The network traced once and both signatures call this trace. The save is given traced
    # functions only: a tf.function it holds (what keras.export.ExportArchive stores) is
    # traced again inside the save, TensorFlow keying its traces by the context they are
    # made in, and the 54M-weight graph stored twice.
    predict_pixels = traced_pixels(model) if traced is None else traced

    def decode(data):
        return _tf_fit_to_square(_tf_decode_rgb(data), size, resize)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
        out = predict_pixels(pixels)
        probs = out["probabilities"]
        top = tf.argmax(probs, axis=-1)
        return {"probabilities": probs, "class_name": tf.gather(class_names, top),
                "confidence": tf.reduce_max(probs, axis=-1), "features": out["features"]}

    # Only the signatures are saved, and the weights they read (a SavedModel needs the
    # variables its functions capture tracked by the saved object); not the Keras model
    # itself, whose tracking would store every weight a second time (keras-team/keras#23553).
    holder = tf.Module()
    holder.weights_read = list(predict_pixels.variables)
    tf.saved_model.save(holder, str(path), signatures={
        "predict_pixels": predict_pixels, "serving_default": serve_bytes.get_concrete_function()})

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = predict_pixels(tf.constant(batch, tf.float32))
        return out["probabilities"].numpy(), out["features"].numpy()

    return run


def load_saved_model(folder: Path):
    """The SavedModel in `folder` loaded: its signatures, to run them."""
    import tensorflow as tf

    return tf.saved_model.load(str(folder))


@contextlib.contextmanager
def graph_optimizer_off() -> Iterator[None]:
    """TensorFlow's graph optimiser (Grappler) off for the functions first called in the
    block: each is run as traced. The optimiser rewrites a graph for speed, not for what it
    computes, and rewriting the 54M-weight network costs seconds at each function's first
    call, more than a batch or two take to run unrewritten. The options in force before the
    block are put back after it, but a function called before it is rewritten again at its
    next call (TensorFlow keys a function's graphs by the options): call no such function
    after the block."""
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": False, **before})


def write_tflite(saved_model: Path, variants: dict[str, Path],
                 calibration: np.ndarray | None = None) -> None:
    """Each TFLite variant ({variant: path}) of the pixels signature of the SavedModel at
    `saved_model`, converted from the folder on disk without loading it in Python.
    `calibration`: float pixels of training images, for `int8` (full-integer weights and
    activations; float pixels in and probabilities out, so every runner feeds it alike)."""
    if not variants:
        return
    if not (saved_model / "saved_model.pb").is_file():
        # The converter would take it for a frozen graph and fail on a missing argument.
        raise FileNotFoundError(f"no SavedModel at {saved_model}")
    import tensorflow as tf
    from tensorflow.lite.python import lite

    debug_info = _debug_info_only(saved_model)
    for variant, path in variants.items():
        # Converted from the folder on disk, not from the loaded signature: given a
        # concrete function, the public converter first saves the SavedModel again into a
        # temporary folder and loads that back, and `from_saved_model` loads it twice more
        # only to list its signatures; this is the converter both of them end in.
        converter = lite.TFLiteSavedModelConverterV2(
            str(saved_model), {tf.saved_model.SERVING}, ["predict_pixels"], debug_info)
        converter.optimizations = ([tf.lite.Optimize.DEFAULT]
                                   if variant in ("dynamic", "float16", "int8") else [])
        converter.target_spec.supported_types = [tf.float16] if variant == "float16" else []
        converter.representative_dataset = None
        converter.target_spec.supported_ops = {tf.lite.OpsSet.TFLITE_BUILTINS}
        if variant == "int8":
            # The activations' ranges, from real images: one at a time, as the converter asks.
            converter.representative_dataset = lambda: ([calibration[i:i + 1]]
                                                         for i in range(len(calibration)))
            converter.target_spec.supported_ops = {tf.lite.OpsSet.TFLITE_BUILTINS_INT8}
        with _loads_answered_by(lite, debug_info):
            path.write_bytes(converter.convert())


def _debug_info_only(saved_model: Path):
    """What the TFLite converter reads from a loaded SavedModel: its debug info (the source
    lines its error messages quote), from the folder when the save kept it, else none. The
    conversion itself reads the folder in C++: a Python load of the SavedModel (every
    function, every weight) would give it nothing more."""
    import types

    from tensorflow.core.framework import graph_debug_info_pb2

    info = graph_debug_info_pb2.GraphDebugInfo()
    kept = saved_model / "debug" / "saved_model_debug_info.pb"
    if kept.is_file():
        info.ParseFromString(kept.read_bytes())
    return types.SimpleNamespace(graph_debug_info=info)


@contextlib.contextmanager
def _loads_answered_by(lite, stand_in) -> Iterator[None]:
    """The converter's own load of the SavedModel answered with `stand_in`
    (`_debug_info_only`): it loads the whole SavedModel only to read its debug info."""
    load = lite._load
    lite._load = lambda *_args, **_kwargs: stand_in
    try:
        yield
    finally:
        lite._load = load


def write_openvino_float(traced, folder: Path) -> None:
    """The OpenVINO IR (model.xml + model.bin) of `traced` (the network traced as the
    SavedModel's pixels signature, `traced_pixels`: the image-bytes one takes strings, which
    OpenVINO does not run) in `folder`, float32 weights (OpenVINO computes in bf16 by itself
    where the CPU has it), the folder renamed into place once whole."""
    import openvino as ov

    with _variables_indexed():
        model = ov.convert_model(traced)
    # Saved while `traced` is held: the converted model shares the weights' memory with the
    # network's variables, it holds no copy of them.
    with _whole_folder(folder) as partial:
        ov.save_model(model, str(partial / OPENVINO_XML), compress_to_fp16=False)


def write_openvino_int8(float_xml: Path, folder: Path, calibration: np.ndarray) -> None:
    """The OpenVINO float IR at `float_xml` (`write_openvino_float`) quantised, weights and
    activations, by NNCF's post-training quantisation calibrated on `calibration` (float
    pixels of training images), in `folder`, renamed into place once whole. OpenVINO and
    NNCF only, no TensorFlow: what package's int8 job runs (`openvino_int8_quantising`)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_xml))
    # One image a sample: NNCF's subset_size counts samples, so it counts images.
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    quantised = nncf.quantize(model, dataset, subset_size=len(calibration))
    with _whole_folder(folder) as partial:
        ov.save_model(quantised, str(partial / OPENVINO_XML))


@contextlib.contextmanager
def _whole_folder(folder: Path) -> Iterator[Path]:
    """A `.partial` sibling of `folder` to write into, renamed to `folder` once the block
    ends: a reader never takes a half-written IR for a whole one."""
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True)
    yield partial
    partial.rename(folder)


@contextlib.contextmanager
def _variables_indexed() -> Iterator[None]:
    """OpenVINO's TensorFlow reader answered from an index of the traced graph's variables.
    It finds a node's variable by scanning every capture of the graph, then every variable
    (a list rebuilt at each access), and asks again for each fact it reads about the node:
    work that grows with the square of the weights' count, most of a conversion's time for
    InceptionResNetV2. The answers are the same: the first capture feeding the node, its
    value read without a copy; the graph does not change while it converts."""
    from openvino.frontend.tensorflow.node_decoder import TFGraphNodeDecoder

    scan = TFGraphNodeDecoder.__dict__["get_variable"]
    graphs: dict[int, tuple] = {}

    def get_variable(operation):
        graph = operation.graph
        if not hasattr(graph, "captures"):
            return None
        if id(graph) not in graphs:
            variables: dict[int, object] = {}
            for variable in graph.variables:
                variables.setdefault(id(variable.handle), variable)
            captured: dict[str, object] = {}
            for var_tensor, op_tensor in graph.captures:
                captured.setdefault(op_tensor.name, var_tensor)
            graphs[id(graph)] = (graph, variables, captured, {})  # the graph held: its id stays
        _graph, variables, captured, answers = graphs[id(graph)]
        name = operation.outputs[0].name
        if name not in answers:
            var_tensor = captured.get(name)
            if var_tensor is None or var_tensor.dtype.name != "resource":
                answers[name] = var_tensor
            else:
                variable = variables.get(id(var_tensor))
                answers[name] = None if variable is None else variable.read_value_no_copy()
        return answers[name]

    TFGraphNodeDecoder.get_variable = staticmethod(get_variable)
    try:
        yield
    finally:
        TFGraphNodeDecoder.get_variable = scan


@contextlib.contextmanager
def job_and_its_group(command: list[str], out) -> Iterator[subprocess.Popen]:
    """`command` started in a session of its own (output to the file `out`, standard input a
    pipe left open: a conversion job exits when it closes (`job.run`), so a parent that
    dies takes it along),
    running while the caller's block runs. On leaving, waits for it (kills it if the block
    raised), then kills whatever it left in its process group: libraries may fork helpers
    that outlive it (OpenVINO's and NNCF's telemetry sends each event from a forked process,
    which can hang without network, and the job ends with os._exit, skipping the cleanup
    that would stop them), each holding a copy of its memory."""
    job = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield job
        # Ended but not reaped: until it is, no other process can take its id, so the group
        # killed below is its own.
        os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)
    except BaseException:
        job.kill()
        raise
    finally:
        with contextlib.suppress(BrokenPipeError):
            job.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


@contextlib.contextmanager
def _job_started_later(what: str, command: list[str]) -> Iterator[Callable[[], None]]:
    """`command` (a conversion job that loads its libraries, then waits for one line on its
    standard input before it reads its input: `job.wait_for_input`) started at once, while
    the caller's block runs (`job_and_its_group`), its output kept aside; the block is given
    `start`, to call once the job's input is whole, and must call it. On leaving the block,
    waits for the job and raises its error, the end of its output, if it failed; an error
    in the block kills it."""
    started = []
    with tempfile.TemporaryDirectory(prefix="imgclf-job-") as tmp:
        log = Path(tmp) / "log"
        with open(log, "wb") as out, job_and_its_group(command, out) as job:
            def start() -> None:
                started.append(True)
                # A job that already failed (its libraries, its images) has closed the pipe:
                # its own error is raised on leaving the block, not this one.
                with contextlib.suppress(BrokenPipeError):
                    job.stdin.write(b"go\n")
                    job.stdin.flush()

            yield start
            if not started:
                raise RuntimeError(f"the {what} job was never started")
        if job.returncode != 0:
            raise RuntimeError(f"{what} conversion failed (exit code {job.returncode}):\n"
                               + log.read_text(errors="replace")[-3000:])


def openvino_int8_quantising(float_xml: Path, folder: Path,
                             calibration: tuple[int, int, str]):
    """`write_openvino_int8(float_xml, folder, pixels)` in a child process
    (`imgclf.export.openvino_job`: OpenVINO and NNCF, no TensorFlow, no Keras model), as
    `_job_started_later`: it decodes its calibration pixels (`calibration` = count of
    training images, image size, resize mode) while it waits for `start`, to be called
    once the float IR is written. NNCF's statistics are mostly single-threaded: the caller
    writes the SavedModel and runs its checks meanwhile instead of before or after the
    quantisation."""
    return _job_started_later("OpenVINO int8", [
        sys.executable, "-m", "imgclf.export.openvino_job", str(float_xml),
        ":".join(map(str, calibration)), str(folder)])


def tflite_converting(saved_model: Path, out: Path):
    """`write_tflite(saved_model, {"dynamic": out})` in a child process
    (`imgclf.export.tflite_job`), as `_job_started_later`: it imports TensorFlow while the
    caller writes the SavedModel, and converts once `start` says the folder is whole. The
    converter is single-threaded and holds Python's global lock for most of its run: in a
    thread it would stall the caller's work, in a process it runs beside it."""
    return _job_started_later("TFLite", [sys.executable, "-m", "imgclf.export.tflite_job",
                                         str(saved_model), str(out)])


SERVING_SAMPLE = 256  # images each serving candidate is checked on: +-1 point at 98%
TIMING_IMAGES = 8  # images of the check sample (one batch) each candidate is timed on


def checked_saved_model(loaded, path: Path, files: list[str], pixels: np.ndarray,
                        reference: np.ndarray) -> dict:
    """The SavedModel written at `path`, as loaded back (`loaded`), against the Keras model
    (`reference`: its probabilities on `pixels`, `files` decoded by the pipeline): its pixels
    signature on the first CHUNK images must give Keras's answers up to round-off
    (FLOAT_TOLERANCE), its image-bytes signature (decoding in TensorFlow) the same top-1 on
    >= BYTES_MIN_AGREEMENT of the files that are no close call; RuntimeError otherwise.
    Returns the check: parity keys, checked_images, size_mb, bytes_signature_*."""
    from imgclf.serving.runners import CHUNK

    runner = saved_model_runner(path, loaded)
    checked = min(len(pixels), CHUNK)
    exact = parity(reference[:checked], runner(pixels[:checked]))
    if exact["top1_agreement"] < 1.0 or exact["max_abs_diff"] > FLOAT_TOLERANCE:
        raise RuntimeError(f"the SavedModel's pixels signature differs from Keras: {exact}")
    agreed, counted = bytes_agreement(loaded, files, reference, CHUNK)
    if agreed < BYTES_MIN_AGREEMENT:
        raise RuntimeError(f"the SavedModel's image-bytes signature agrees with Keras on top-1 "
                           f"for {agreed} < {BYTES_MIN_AGREEMENT} of the {counted} images "
                           "that are no close call")
    return {"size_mb": round(runner.size_bytes / 1e6, 2), **exact, "checked_images": checked,
            "bytes_signature_top1_agreement": agreed,
            "bytes_signature_images_counted": counted}


def check_trained_answers(probs: np.ndarray, features: np.ndarray,
                             trained_probs: np.ndarray, trained_features: np.ndarray) -> None:
    """The trained model's stored answers (`trained_*`) against its traced graph's on the
    same images: the same top-1 on every image that is no close call and pooled features
    within FEATURES_MIN_COSINE, or UserError. They differ by round-off only (the stored
    activations at the cut are features.dtype); a model file trained again without them
    differs in its answers."""
    agreed = parity(probs, trained_probs)["decided_top1_agreement"]
    cosine = min_cosine(features, trained_features)
    if agreed < 1.0 or cosine < FEATURES_MIN_COSINE:
        raise UserError(f"{paths.EMBEDDINGS} does not hold the answers of {paths.MODEL_FILE} "
                        f"(top-1 agreement {agreed}, smallest cosine {cosine} on "
                        f"{len(probs)} validation and training images): they come from "
                        "different training runs (dvc repro train)")


def check_sample(val_images: int, train_images: int, calibrated: int) -> dict[str, list[int]]:
    """Which images the serving candidates are checked on ({split: manifest indices}):
    SERVING_SAMPLE of them (all when the two splits hold fewer), evenly spaced over each
    split's classes: validation images first, then training images, those the int8 copy
    was not calibrated on before those it was (`calibrated`: how many,
    `sample_pixels("train", calibrated)`), so the check's cost and power do not change with
    the data once it holds that many images."""
    from imgclf.data.manifests import evenly_spaced_indices

    val = evenly_spaced_indices(val_images, SERVING_SAMPLE)
    used = evenly_spaced_indices(train_images, calibrated)
    unused = sorted(set(range(train_images)) - set(used))
    train = []
    for spare in (unused, used):
        train += [spare[i] for i in evenly_spaced_indices(
            len(spare), SERVING_SAMPLE - len(val) - len(train))]
    return {"val": val, "train": sorted(train)}


def package(params: Params, classes: list[str],
            trained: dict[str, tuple[np.ndarray, np.ndarray]],
            meanwhile: Callable[[Callable], None] = lambda forward: None) -> tuple[dict, dict]:
    """The Keras model's (paths.MODEL_FILE's) SavedModel (paths.SAVED_MODEL_DIR,
    `write_saved_model`) and what the registered model may serve with: the dynamic-range
    TFLite copy converted from the SavedModel (paths.SERVING_COPY, always) and the OpenVINO
    copies `package.openvino` names, of the same traced graph (paths.OPENVINO_DIR, one
    folder each), each written in one rename; the copies timed and checked fastest first
    against the Keras model on `check_sample`'s images (`checked_fastest_first`: the slower
    ones are not checked once one agrees). The Keras model's answers there are `trained`'s
    ({"val", "train": (probabilities, pooled features) on every image of the split in
    manifest order}: what `train` stored for the selective stage, models/embeddings.npz), not
    a pass of its own: the traced graph runs only on the CHUNK images that check the
    SavedModel (`checked_saved_model`), and those same images check `trained` itself
    (`check_trained_answers`). The Keras model is loaded and traced once, here, and the
    OpenVINO float IR converted from that trace. The int8 copy (quantised from the float
    IR) and the TFLite copy (converted from the SavedModel's folder) convert in processes of
    their own, both started first and converting as soon as this one has written their
    input; meanwhile it writes the SavedModel, runs `meanwhile(forward)` (the caller's
    other work with the traced graph), then checks the SavedModel as loaded back (its
    signatures run as traced, `graph_optimizer_off`). Returns (candidates by format, the
    SavedModel's check)."""
    from imgclf.data.manifests import evenly_spaced_indices, pixels_of, read_manifest
    from imgclf.serving.runners import CHUNK

    size, resize = params.model.image_size, params.model.resize
    saved_model = paths.SAVED_MODEL_DIR
    # The OpenVINO formats asked for, by their folder's name (the variant: float, int8).
    openvino = {fmt: path.name for fmt, path in paths.SERVING_FORMATS.items()
                if path.parent == paths.OPENVINO_DIR and path.name in params.package.openvino}

    int8 = "int8" in openvino.values()
    with io.replaced_dir(paths.OPENVINO_DIR) as staging, \
            io.replacing(paths.SERVING_COPY) as serving_copy, \
            tempfile.TemporaryDirectory(prefix="imgclf-openvino-") as scratch:
        # int8 is quantised from the float IR, written even when float is not asked for.
        float_ir = staging / "float" if "float" in openvino.values() else Path(scratch) / "float"
        # Both jobs started before this process loads anything: they load their own
        # libraries meanwhile, and start converting when their input is written.
        with (openvino_int8_quantising(float_ir / OPENVINO_XML, staging / "int8",
                                       (params.package.calibration_images, size, resize))
              if int8 else contextlib.nullcontext(lambda: None)) as quantise_int8, \
                tflite_converting(saved_model, serving_copy) as convert_tflite:
            import keras

            model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
            # The one trace of the network: the OpenVINO IR, the SavedModel's signatures,
            # every check and the caller's work.
            traced = traced_pixels(model)
            if openvino:
                write_openvino_float(traced, float_ir)
                quantise_int8()
            with io.replaced_dir(saved_model) as written:
                forward = write_saved_model(model, classes, size, resize, written, traced)
            convert_tflite()
            split_files = {split: read_manifest(split, classes)[0] for split in trained}
            sample = check_sample(len(split_files["val"]), len(split_files["train"]),
                                  params.package.calibration_images if int8 else 0)
            files = [split_files[split][i] for split, rows in sample.items() for i in rows]
            pixels = pixels_of(files, size, resize)
            reference, reference_features = (
                np.concatenate([trained[split][k][rows] for split, rows in sample.items()])
                for k in (0, 1))
            # The SavedModel's checks look at the conversion, not at the data: a few images,
            # evenly spaced over the sample's classes, whatever the validation split's size.
            exact = evenly_spaced_indices(len(files), CHUNK)
            exact_probs, exact_features = forward(pixels[exact])
            check_trained_answers(exact_probs, exact_features, reference[exact],
                                  reference_features[exact])
            meanwhile(forward)
            # Each signature runs once, on one batch: TensorFlow's graph optimiser would take
            # longer to rewrite the network for it than the batch takes to run unrewritten.
            # Last of this process's TensorFlow work (graph_optimizer_off says why).
            with graph_optimizer_off():
                saved_model_check = checked_saved_model(
                    load_saved_model(saved_model), saved_model, [files[i] for i in exact],
                    pixels[exact], exact_probs)
        # Timed once the jobs have ended, so that nothing else shares the CPU.
        made = {"tflite_dynamic": serving_copy,
                **{fmt: staging / variant for fmt, variant in openvino.items()}}
        candidates = checked_fastest_first(made, pixels, reference, reference_features)
    return candidates, saved_model_check


def package_summary(saved_model_check: dict, candidates: dict[str, dict]) -> str:
    """What the package stage prints: the SavedModel's check (`checked_saved_model`) and
    each serving candidate (`checked_fastest_first`, fastest first)."""
    counted = saved_model_check["bytes_signature_images_counted"]
    by_bytes = (f"agrees on {saved_model_check['bytes_signature_top1_agreement']:.1%} of "
                f"{counted} images" if counted
                else "not compared: Keras calls every image checked a close call")
    lines = [f"package: {paths.SAVED_MODEL_DIR} (as loaded back: Keras's answers, max "
             f"difference {saved_model_check['max_abs_diff']:.1e}; its image-bytes signature "
             f"{by_bytes}), {paths.KERAS_TEST_PROBS}, serving candidates (against Keras on "
             "its check sample: images/s, decided top-1 agreement, smallest cosine of the "
             "pooled features):"]
    for fmt, c in candidates.items():
        found = (f"{c['top1_agreement']:.1%} of {c['checked_images']}  cosine "
                 f"{c['features_min_cosine']:.5f}" if c["checked_images"]
                 else "not checked: a faster copy agrees")
        gate = "  (below a gate: auto never serves it)" if c["agrees"] is False else ""
        engine = f"  computes in {c['precision']}" if c["precision"] else ""
        lines.append(f"  {fmt:<15}{c['size_mb']:>8.1f} MB {c['images_per_s']:>7.1f} img/s  "
                     f"{found}{engine}{gate}")
    return "\n".join(lines)


def checked_fastest_first(made: dict[str, Path], pixels: np.ndarray, reference: np.ndarray,
                          reference_features: np.ndarray) -> dict[str, dict]:
    """Each copy in `made` ({format: path}) timed on the same TIMING_IMAGES of `pixels`
    (images/s at that batch, after a warm-up call), then checked against the Keras model's
    answers on `pixels` (`reference`: probabilities, `reference_features`: pooled features),
    fastest first: decided top-1 agreement and the smallest cosine of the pooled features;
    it agrees when both reach their gates (`metrics.stands_in`).
    A copy stops being run as soon as it cannot reach them (checked_images says how far it
    got); the first that agrees is what `mlflow.serving_format: auto` serves, so the slower
    ones are not run over the sample (their agreement keys None, checked_images 0).
    Returns, fastest first, each format's images_per_s, size_mb, precision (what the engine
    computed in, where it chooses), top1_agreement, features_min_cosine, checked_images,
    parity, agrees."""
    from imgclf.serving.runners import CHUNK, throughput

    runners = {fmt: load_runner(fmt, path) for fmt, path in made.items()}
    speeds = {fmt: throughput(runner, pixels[:TIMING_IMAGES])
              for fmt, runner in runners.items()}
    counted = decided(reference)
    # Disagreements on counted images that still leave the copy at the gate.
    allowed = int(np.floor(counted.sum() * (1 - QUANTISED_MIN_AGREEMENT) + 1e-9))
    checked: dict[str, dict] = {}
    for fmt in sorted(runners, key=lambda f: -speeds[f]):
        runner = runners[fmt]
        checked[fmt] = {"images_per_s": speeds[fmt], "size_mb": round(runner.size_bytes / 1e6, 2),
                        "precision": runner.precision, "top1_agreement": None,
                        "features_min_cosine": None, "checked_images": 0, "parity": None,
                        "agrees": None}
        if any(c["agrees"] for c in checked.values()):
            continue
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(pixels), CHUNK):
            parts.append(runner.both(pixels[start:start + CHUNK]))
            probs, features = (np.concatenate(column) for column in zip(*parts, strict=True))
            seen = len(probs)
            wrong = ((probs.argmax(1) != reference[:seen].argmax(1)) & counted[:seen]).sum()
            if wrong > allowed or min_cosine(reference_features[:seen],
                                             features) < FEATURES_MIN_COSINE:
                break  # below a gate whatever the rest of the sample says
        seen = sum(len(p) for p, _ in parts)
        if not seen:
            continue
        agreed = parity(reference[:seen], probs)
        agreement = agreed["decided_top1_agreement"]
        cosine = min_cosine(reference_features[:seen], features)
        checked[fmt].update(
            top1_agreement=agreement, features_min_cosine=cosine, checked_images=seen,
            parity=agreed, agrees=seen == len(pixels) and stands_in(agreement, cosine))
    return checked


def collect_answers(runners: dict, files: list[str], size: int, resize: str,
                    batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every runner's (probabilities, pooled features) on the same decoded test pixels, one
    batch at a time."""
    out: dict[str, list] = {name: [] for name in runners}
    for _good, pixels, bad in iter_batches(files, size, resize, batch_size):
        if bad:
            raise UserError(f"test image {files[bad[0][0]]} cannot be read: rerun prepare")
        for name, runner in runners.items():
            out[name].append(runner.both(pixels))
    return {k: tuple(np.concatenate(column) for column in zip(*v, strict=True))
            for k, v in out.items()}


def bytes_agreement(saved_model, files: list[str], reference: np.ndarray,
                    batch_size: int) -> tuple[float, int]:
    """Top-1 agreement of the image-bytes signature (TF decoding) with Keras on PIL pixels,
    over the images Keras does not call close; (agreement, how many such images)."""
    fn = saved_model_bytes_fn(saved_model)
    predicted = []
    for start in range(0, len(files), batch_size):
        blobs = [Path(f).read_bytes() for f in files[start:start + batch_size]]
        predicted.append(fn(blobs)["probabilities"].numpy().argmax(1))
    counted = decided(reference)
    same = np.concatenate(predicted) == reference.argmax(1)
    return (round(float(same[counted].mean()), 6) if counted.any() else 1.0), int(counted.sum())


def recommend(formats: dict[str, dict], exact: list[str]) -> str:
    """The format to deploy: of the exact ones and those whose check says they may stand in
    for Keras (`agrees`: `metrics.stands_in`, the rule that decides what serves), the fastest
    when timed (export.measure), else the smallest: size is what is known without timings,
    it is what a deployment downloads, and on CPUs the quantised copies also run faster."""
    usable = exact + [n for n in formats if n not in exact and n not in ("keras", "saved_model")
                      and formats[n].get("agrees")]
    if all("images_per_s" in formats[n] for n in usable):
        return max(usable, key=lambda n: formats[n]["images_per_s"])
    return min(usable, key=lambda n: formats[n]["size_mb"])


def export_all(params: Params, keras_file: Path, classes: list[str], files: list[str],
               saved_model: Path, keras_answers: tuple[np.ndarray, np.ndarray],
               checks: dict[str, dict],
               packaged: dict[str, Path] | None = None) -> dict:
    """models/export/ in one rename: every format with its size and its agreement with the
    Keras model (and with `export.measure`, its speed); returns the report.
    `keras_file`: the Keras model, loaded only when `export.measure` times it;
    `saved_model`: the model's SavedModel (package's), shipped as it is and the source of
    the TFLite variants package did not convert; `packaged`: the copies package already
    converted from it ({format: file or folder}: the serving candidates, TFLite and
    OpenVINO), shipped as they are; `checks`: package's check of each (and of the SavedModel,
    `saved_model`: `checked_saved_model`), on the check sample, reported as it is: a copy is
    not run again here. A TFLite variant converted here is checked on (up to
    `export.parity_images` of) the test `files`, against `keras_answers` (package's Keras
    probabilities and pooled features on every test file, models/keras_test_probs.npz), by
    the gates that decide what serves (`metrics.stands_in`). TensorFlow is loaded
    only to convert such a variant or to time (export.measure)."""
    from imgclf.data.manifests import evenly_spaced_indices, pixels_of, sample_pixels

    n_test = len(files)
    # A check of the conversion, not of the data: a sample that does not grow with the test
    # split (evaluate measures the served format on all of it).
    chosen = evenly_spaced_indices(n_test, params.export.parity_images)
    files = [files[i] for i in chosen]
    reference, reference_features = (answers[chosen] for answers in keras_answers)

    size, resize = params.model.image_size, params.model.resize
    batch, measure = params.export.bench_batch_size, params.export.measure
    with io.replaced_dir(paths.EXPORT_DIR) as staging:
        shutil.copytree(saved_model, staging / SAVED_MODEL)
        # The OpenVINO copies ship whenever package made them; TFLite variants as
        # export.tflite names them, converted here unless package already did.
        shipped = {f: p for f, p in (packaged or {}).items() if f.startswith("openvino")
                   or f.removeprefix("tflite_") in params.export.tflite}
        for fmt, source in shipped.items():
            if source.is_dir():
                shutil.copytree(source, format_path(staging, fmt))
            else:
                shutil.copyfile(source, format_path(staging, fmt))
        converted = {v: staging / tflite_name(v) for v in params.export.tflite
                     if f"tflite_{v}" not in shipped}
        write_tflite(staging / SAVED_MODEL, converted,
                     sample_pixels("train", params.export.calibration_images, size, resize)
                     if "int8" in converted else None)
        (staging / LABELS).write_text("\n".join(classes) + "\n", encoding="utf-8")

        new = {f"tflite_{v}": load_runner(f"tflite_{v}", path) for v, path in converted.items()}
        answers = collect_answers(new, files, size, resize, batch) if new else {}
        sample = pixels_of(files[:8], size, resize) if measure else None

        def timed(runner) -> dict:  # every format timed on the same batch, or none
            return speed(runner, sample, batch) if measure else {}

        formats: dict[str, dict] = {}
        keras_timing = {}
        if measure:
            import keras

            model = keras.models.load_model(keras_file, safe_mode=True)
            keras_timing = timed(Runner(
                "keras_predict", lambda x: model.predict(x, batch_size=len(x), verbose=0), 0))
        formats["keras"] = {"size_mb": round(keras_file.stat().st_size / 1e6, 2),
                            **keras_timing, "top1_agreement": 1.0, "max_abs_diff": 0.0,
                            "agrees": True}
        # The SavedModel is the Keras graph itself, exact or broken everywhere: package
        # checked it as loaded back from disk, with its image-bytes signature.
        check = checks[SAVED_MODEL]
        formats[SAVED_MODEL] = {
            **{k: v for k, v in check.items() if not k.startswith("bytes_")},
            **(timed(saved_model_runner(staging / SAVED_MODEL)) if measure else {}),
            "checked_on": "package", "agrees": True}  # else package would have failed
        names = [f"tflite_{v}" for v in params.export.tflite] + [
            f for f in shipped if f.startswith("openvino")]
        for name in names:
            path = format_path(staging, name)
            if name in new:
                runner = new[name]
                probs, features = answers[name]
                agreed = parity(reference, probs)
                cosine = min_cosine(reference_features, features)
                agreement = {**agreed, "features_min_cosine": cosine,
                             "agrees": stands_in(agreed["decided_top1_agreement"], cosine),
                             "checked_images": len(probs), "checked_on": "test"}
            else:  # loaded only to be timed
                runner = load_runner(name, path) if measure else None
                # None: not checked, since a faster copy agrees (checked_fastest_first).
                candidate = checks[name]
                agreement = ({**candidate["parity"], "checked_on": "package",
                              "features_min_cosine": candidate["features_min_cosine"],
                              "agrees": candidate["agrees"],
                              "checked_images": candidate["checked_images"]}
                             if candidate["parity"] else
                             {"top1_agreement": None, "decided_top1_agreement": None,
                              "features_min_cosine": None, "agrees": None,
                              "checked_images": 0, "checked_on": None})
            formats[name] = {"size_mb": round(files_size(path) / 1e6, 2), **timed(runner),
                             **agreement}
        exact = ["saved_model"] + (["tflite_float32"] if "tflite_float32" in formats else [])
        broken = [n for n in exact if formats[n]["top1_agreement"] < 1.0
                  or formats[n]["max_abs_diff"] > FLOAT_TOLERANCE]
        if broken:
            raise RuntimeError(f"export parity failed for {broken}: "
                               f"{ {n: formats[n] for n in broken} }")
        recommended = recommend(formats, exact)
        report = {
            "n_test": n_test, "parity_images": len(files), "image_size": size,
            "resize": resize, "measured": measure, "batch_size": batch if measure else None,
            "formats": formats, "recommended": recommended,
            "recommended_by": "images_per_s" if measure else "size_mb",
            "speedup_vs_keras_predict": round(
                formats[recommended]["images_per_s"] / formats["keras"]["images_per_s"], 2)
            if measure else None,
            # package's check, on its check sample
            "bytes_signature_top1_agreement": check["bytes_signature_top1_agreement"],
            "bytes_signature_images_counted": check["bytes_signature_images_counted"],
        }
        (staging / META).write_text(json.dumps(
            {"image_size": size, "resize": resize, "recommended": recommended,
             "max_pixels": params.prepare.max_pixels,
             "formats": {n: {"top1_agreement": f["top1_agreement"]}
                         for n, f in formats.items()}}, indent=2), encoding="utf-8")
    return report
