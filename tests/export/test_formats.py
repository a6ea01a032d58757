"""export: deployable formats that give the Keras model's answers, and their speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_module, set_params

from imgclf.metrics import decided


def test_recommended_is_the_fastest_that_agrees_when_timed_else_the_smallest():
    from imgclf.export.formats import recommend
    from imgclf.metrics import stands_in

    formats = {"saved_model": {"size_mb": 220, "top1_agreement": 1.0, "agrees": True},
               "tflite_dynamic": {"size_mb": 56, "agrees": stands_in(0.99, 0.9999)},
               "tflite_int8": {"size_mb": 57, "agrees": stands_in(0.90, 0.9999)},
               "openvino_int8": {"size_mb": 58, "agrees": stands_in(1.0, 0.990)},
               "openvino": {"size_mb": 10, "agrees": None}}  # package did not check it
    assert recommend(formats, ["saved_model"]) == "tflite_dynamic"
    # Smaller, each below one gate (top-1; the pooled features the status reads) or unchecked.
    for name in ("tflite_int8", "openvino_int8", "openvino"):
        formats[name]["size_mb"] = 30
        assert recommend(formats, ["saved_model"]) == "tflite_dynamic"
    timed = {n: {**f, "images_per_s": s} for (n, f), s in zip(formats.items(), (9, 5, 20, 30, 40),
                                                                   strict=True)}
    assert recommend(timed, ["saved_model"]) == "saved_model"
    timed["tflite_dynamic"]["images_per_s"] = 10
    assert recommend(timed, ["saved_model"]) == "tflite_dynamic"


def test_candidates_are_checked_fastest_first_until_one_agrees(monkeypatch):
    import time

    from imgclf.export import formats
    from imgclf.serving.runners import CHUNK, Runner

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (80, 8, 8, 3)).astype(np.float32)
    reference = np.eye(4, dtype=np.float32)[np.arange(80) % 4] * 0.9 + 0.025
    features = rng.normal(size=(80, 6)).astype(np.float32)
    sample_calls = {}

    def runner(name: str, delay: float, wrong: bool) -> Runner:
        def both(batch):
            time.sleep(delay)
            if len(batch) > formats.TIMING_IMAGES:  # the check, not the timing
                sample_calls[name] = sample_calls.get(name, 0) + 1
            index = [next(j for j, p in enumerate(pixels) if (p == b).all()) for b in batch]
            # wrong: every answer moved one class on
            probs = np.roll(reference[index], 1, axis=1) if wrong else reference[index]
            return probs, features[index]
        return Runner(name, lambda b: both(b)[0], 1_000_000, both)

    # fast but below the gate, then two that agree: the faster of them serves, the slowest
    # is timed and never run over the sample; the one below the gate stops at its first
    # chunk of images, where it already cannot reach it
    made = {"slow": runner("slow", 0.03, False), "fast": runner("fast", 0.0, True),
            "middle": runner("middle", 0.01, False)}
    monkeypatch.setattr(formats, "load_runner", lambda fmt, path: made[fmt])
    checked = formats.checked_fastest_first({f: Path(f) for f in made}, pixels, reference,
                                            features)
    assert list(checked) == ["fast", "middle", "slow"]  # fastest first, as timed
    assert checked["fast"]["images_per_s"] > checked["middle"]["images_per_s"] \
        > checked["slow"]["images_per_s"]
    assert checked["fast"]["agrees"] is False and checked["fast"]["top1_agreement"] == 0.0
    assert checked["fast"]["checked_images"] == CHUNK and sample_calls["fast"] == 1
    assert checked["middle"]["agrees"] is True and checked["middle"]["checked_images"] == 80
    assert checked["slow"]["agrees"] is None and checked["slow"]["checked_images"] == 0
    assert "slow" not in sample_calls and sample_calls["middle"] == 3


def test_a_conversion_that_fails_stops_the_stage_with_its_error(tmp_path):
    from imgclf.export.formats import tflite_converting

    out = tmp_path / "model_dynamic.tflite"
    with pytest.raises(RuntimeError, match="TFLite conversion failed") as failed, \
            tflite_converting(tmp_path / "no_saved_model", out) as start:
        start()  # the caller's own work done, the job's input in place (here: none)
    assert "no_saved_model" in str(failed.value)  # the job's own error, not just its code
    assert not out.exists()


def test_a_job_the_stage_never_starts_fails_the_stage_instead_of_waiting():
    import subprocess
    import sys

    from imgclf.export.formats import _job_started_later

    # A job waiting for its input as the conversion jobs do (job.wait_for_input): a stage
    # that forgot to start it must not wait on it for ever.
    waits = ("from imgclf.export import job; job.wait_for_input(); "
             "job.run(lambda: print('converted'))")
    with pytest.raises(RuntimeError, match="never started"), \
            _job_started_later("test", [sys.executable, "-c", waits]):
        pass
    with _job_started_later("test", [sys.executable, "-c", waits]) as start:
        start()
    # Its input closed before the line that says it is whole: the job ends, converting nothing.
    job = subprocess.Popen([sys.executable, "-c", waits], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    job.stdin.close()
    assert job.wait(timeout=60) == 3
    assert b"converted" not in job.stdout.read()


def test_a_job_leaves_no_process_of_its_own_behind(tmp_path):
    import sys
    import time

    from imgclf.export.formats import job_and_its_group

    # A helper the job forked and left running (as OpenVINO's telemetry does, whose forks
    # may hang for good): it ends with the job instead of holding a copy of its memory.
    marker = f"{time.time() % 1000 + 1000:.4f}"
    forks = f"import subprocess; subprocess.Popen(['sleep', '{marker}'])"

    def left() -> list[Path]:
        def command(proc: Path) -> bytes:
            try:
                return (proc / "cmdline").read_bytes()
            except OSError:  # ended meanwhile
                return b""

        return [proc for proc in Path("/proc").iterdir() if proc.name.isdigit()
                and command(proc) == f"sleep\0{marker}\0".encode()]

    with open(tmp_path / "log", "wb") as out, \
            job_and_its_group([sys.executable, "-c", forks], out) as job:
        deadline = time.monotonic() + 30
        while not left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left()  # the helper runs while the job does
    assert job.returncode == 0
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left()


def _exits_when_its_parent_is_gone(module: str, args: list[str], cwd: Path) -> None:
    import subprocess
    import sys

    # The pipe's other end closed at once, as when the package stage is killed: the job
    # stops instead of converting into a staging path nobody will read.
    job = subprocess.Popen([sys.executable, "-m", f"imgclf.export.{module}", *args], cwd=cwd,
                           stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    job.stdin.close()
    assert job.wait(timeout=120) == 3, job.stderr.read().decode()[-2000:]


def test_the_tflite_job_exits_when_its_parent_is_gone(tmp_path):
    (tmp_path / "saved_model").mkdir()
    _exits_when_its_parent_is_gone("tflite_job", ["saved_model", "model.tflite"], tmp_path)
    assert not (tmp_path / "model.tflite").exists()


def test_the_openvino_job_exits_when_its_parent_is_gone(trained_project, tmp_path):
    # It decodes its calibration images first (the project's), then waits for the float IR.
    _exits_when_its_parent_is_gone(
        "openvino_job", [str(trained_project / "models/openvino/float/model.xml"), "4:75:crop",
                         str(tmp_path / "int8")], trained_project)
    assert not (tmp_path / "int8").exists()


def test_export_formats_agree_with_keras_and_serve_image_bytes(trained_project):
    # Timed too (export.measure): the speed table and the served version's costs.
    set_params(trained_project, export__measure=True)
    result = run_module("stages.export", trained_project)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((trained_project / "reports/export.json").read_text())
    formats = report["formats"]
    assert set(formats) == {"keras", "saved_model", "tflite_float32", "tflite_dynamic",
                            "tflite_int8", "openvino", "openvino_int8"}
    for name in ("saved_model", "tflite_float32"):
        assert formats[name]["top1_agreement"] == 1.0
        assert formats[name]["max_abs_diff"] <= 1e-4
    for fmt in formats.values():
        assert fmt["size_mb"] > 0 and fmt["images_per_s"] > 0 and fmt["latency_ms_batch1"] > 0
    # The weights once: the SavedModel's variables are the size of the float32 TFLite model
    # (the same weights), not twice it (keras-team/keras#23553).
    export = trained_project / "models/export"
    variables = sum(f.stat().st_size for f in (export / "saved_model/variables").iterdir())
    assert variables < 1.2 * (export / "model_float32.tflite").stat().st_size
    # The recommended format is the fastest of those that pass the gates that decide what
    # serves (decided top-1, the pooled features' cosine), by package's check or export's own;
    # a copy below one, or one package did not check, is never recommended.
    for name, fmt in formats.items():
        if fmt.get("features_min_cosine") is not None:
            assert fmt["agrees"] == (fmt["decided_top1_agreement"] >= 0.98
                                     and fmt["features_min_cosine"] >= 0.999), name
    candidates = json.loads((trained_project / "reports/package.json").read_text())["candidates"]
    for name, candidate in candidates.items():
        assert formats[name]["agrees"] == candidate["agrees"]
    assert formats["tflite_int8"]["features_min_cosine"] is not None  # checked by export
    usable = [n for n, f in formats.items() if n != "keras" and f["agrees"]]
    assert report["recommended"] == max(usable, key=lambda n: formats[n]["images_per_s"])
    assert report["speedup_vs_keras_predict"] == pytest.approx(
        formats[report["recommended"]]["images_per_s"] / formats["keras"]["images_per_s"],
        abs=0.01)

    # The reported agreement is the agreement: a copy package checked, run again on the
    # images it was checked on (`check_sample`'s, as far as its check went), agrees with the
    # Keras model exactly as often as the report says; one it did not check says so. float32
    # and int8, converted by export, were checked on the test images.
    from imgclf.export.formats import check_sample
    from imgclf.serving.batches import iter_batches
    from imgclf.serving.runners import format_path, load_keras_file, load_runner, tflite_runner

    def split_files(split: str) -> list[str]:
        rows = (trained_project / f"data/prepared/{split}.csv").read_text().splitlines()[1:]
        return [str(trained_project / line.split(",")[0]) for line in rows]

    def pixels_of(files: list[str]) -> np.ndarray:
        return np.concatenate([p for _, p, _ in iter_batches(files, 75, "crop", 32)])

    val, train = split_files("val"), split_files("train")
    sample = check_sample(len(val), len(train), 100)  # package.calibration_images
    sample_files = [val[i] for i in sample["val"]] + [train[i] for i in sample["train"]]
    sample_pixels = pixels_of(sample_files)
    assert len(sample_pixels) == min(256, len(val) + len(train))
    keras_model = load_keras_file(trained_project / "models/model.keras",
                                  trained_project / "data/prepared/classes.json", None, "crop")
    assert any(c["checked_images"] for c in candidates.values())
    checks = [(name, "package", sample_pixels[:c["checked_images"]])
              for name, c in candidates.items() if c["checked_images"]]
    pixels = pixels_of(split_files("test"))
    for name, on, images in checks + [("tflite_int8", "test", pixels)]:
        runner = load_runner(name, format_path(export, name))
        agreement = float((keras_model.predict(images).argmax(1)
                           == runner(images).argmax(1)).mean())
        assert formats[name]["checked_on"] == on
        assert formats[name]["checked_images"] == len(images)
        assert formats[name]["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
    for name, candidate in candidates.items():
        if not candidate["checked_images"]:
            assert formats[name]["top1_agreement"] is None
            assert formats[name]["checked_on"] is None

    # int8 is full-integer: int8 weights and activations inside, float pixels in and
    # probabilities out like every other format, close to Keras (calibrated on train images).
    from ai_edge_litert.interpreter import Interpreter

    int8_file = export / "model_int8.tflite"
    types = {t["dtype"] for t in Interpreter(model_path=str(int8_file)).get_tensor_details()}
    assert np.int8 in types
    int8 = tflite_runner(int8_file, "i")(pixels)
    lite = tflite_runner(export / "model_dynamic.tflite", "d")
    assert int8.shape == lite(pixels).shape and np.allclose(int8.sum(1), 1, atol=1e-2)
    assert np.abs(int8 - keras_model.predict(pixels)).max() < 0.1

    # OpenVINO: the float copy computes in bf16 where the CPU has it (else float32), int8
    # quantises weights and activations (NNCF); both answer close to Keras, with the pooled
    # features from the same call, and without TensorFlow.
    from imgclf.serving.runners import openvino_runner

    reference = keras_model.predict(pixels)
    for name, tolerance in (("openvino", 0.02), ("openvino_int8", 0.1)):
        runner = openvino_runner(export / name, name)
        probs, features = runner.both(pixels)
        assert np.abs(probs - reference).max() < tolerance
        assert features.shape == (len(pixels), 1536)
        assert runner.precision in ("f32", "bf16")
    xml = (export / "openvino_int8/model.xml").read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml  # activations quantised, not just weights
    from imgclf.paths import SERVING_FORMATS

    for name in ("openvino", "openvino_int8"):  # the package stage's copies, as they are
        packaged = trained_project / SERVING_FORMATS[name] / "model.bin"
        assert (export / name / "model.bin").read_bytes() == packaged.read_bytes()

    # One conversion per format: the package stage's dynamic-range copy is the file export
    # ships and, when it serves, the one the registered version carries.
    registered = json.loads((trained_project / "reports/register.json").read_text())
    if registered["serving_format"] == "tflite_dynamic":
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{trained_project / 'mlflow.db'}"
        logged = MlflowClient(uri, uri).get_logged_model(
            registered["model_uri"].removeprefix("models:/"))
        served = Path(logged.artifact_location.removeprefix("file://"))
        packaged = (trained_project / "models/model_dynamic.tflite").read_bytes()
        assert (export / "model_dynamic.tflite").read_bytes() == packaged
        assert (served / "artifacts/model_dynamic.tflite").read_bytes() == packaged

    # What serving the registered version costs, measured through a real server.
    serving = report["serving"]
    assert serving["model"] == "models:/imgclf/1"
    assert serving["cold_start_seconds"] > 0 and serving["images_per_s_batch32"] > 0
    served_reqs = [r.split("==")[0] for r in serving["requirements"]]
    assert served_reqs[:4] == ["mlflow-skinny", "numpy", "pandas", "pillow"]
    assert sum(engine in served_reqs for engine in ("ai-edge-litert", "openvino",
                                                    "tensorflow")) == 1
    # A TFLite-served environment is a fraction of a TensorFlow one.
    from imgclf.tracking.deployment import environment_mb

    if "ai-edge-litert" in served_reqs:
        assert serving["environment_mb"] < environment_mb(["tensorflow-cpu"]) / 2

    folder = trained_project / "models/export"
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    assert (folder / "labels.txt").read_text().splitlines() == classes
    # The serving signature takes encoded files: a client sends bytes, not tensors.
    served = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]
    test = (trained_project / "data/prepared/test.csv").read_text().splitlines()[1:]
    files = [trained_project / line.split(",")[0] for line in test]
    out = served(image_bytes=tf.constant([f.read_bytes() for f in files]))
    probs = out["probabilities"].numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [c.decode() for c in out["class_name"].numpy()] == [classes[i]
                                                              for i in probs.argmax(1)]
    np.testing.assert_allclose(out["confidence"].numpy(), probs.max(axis=1), atol=1e-6)
    # It decodes and resizes in TensorFlow; its answers are the Keras model's on the
    # pipeline's pixels, up to resampling round-off.
    reference = keras_model.predict(pixels)
    assert np.abs(probs - reference).max() < 0.05
    # package checked it, loaded back, on one batch of its check sample (evenly spaced), and
    # says how often top-1 agrees; export reports that check as it is.
    from imgclf.data.manifests import evenly_spaced_indices
    from imgclf.serving.runners import CHUNK

    exact = evenly_spaced_indices(len(sample_files), CHUNK)
    val_reference = keras_model.predict(sample_pixels[exact])
    val_probs = served(image_bytes=tf.constant([Path(sample_files[i]).read_bytes()
                                                for i in exact]))["probabilities"].numpy()
    counted = decided(val_reference)  # close calls (round-off may flip them) are not counted
    checked = json.loads((trained_project / "reports/package.json").read_text())["saved_model"]
    assert checked["bytes_signature_images_counted"] == int(counted.sum())
    if counted.any():
        assert checked["bytes_signature_top1_agreement"] == pytest.approx(
            float((val_probs.argmax(1) == val_reference.argmax(1))[counted].mean()), abs=1e-6)
    for key in ("bytes_signature_images_counted", "bytes_signature_top1_agreement"):
        assert report[key] == checked[key]



def test_export_of_the_packaged_copies_runs_without_tensorflow(trained_project, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    # A copy of the project, its files linked (export replaces what it writes, never edits
    # it in place) but for the database MLflow writes into.
    project = tmp_path / "project"
    shutil.copytree(trained_project, project, symlinks=True,
                    copy_function=lambda src, dst: (shutil.copy2 if src.endswith(".db")
                                                    else os.link)(src, dst))
    set_params(project, export__tflite=["dynamic"], export__measure=False)
    no_tensorflow = ("import runpy, sys; sys.modules['tensorflow'] = None; "
                     "sys.modules['keras'] = None; runpy.run_module('stages.export', "
                     "run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([sys.executable, "-c", no_tensorflow], cwd=project, text=True,
                            capture_output=True, env={**env, "PYTHONPATH": str(ROOT)},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((project / "reports/export.json").read_text())
    assert set(report["formats"]) == {"keras", "saved_model", "tflite_dynamic", "openvino",
                                      "openvino_int8"}
    packaged = json.loads((project / "reports/package.json").read_text())["saved_model"]
    assert report["formats"]["saved_model"]["max_abs_diff"] == packaged["max_abs_diff"]
    assert (project / "models/export/saved_model/saved_model.pb").is_file()

class _FakeSavedModel:
    """A loaded SavedModel's two signatures, answering what the test hands them."""

    def __init__(self, pixels_probs: np.ndarray, bytes_probs: np.ndarray):
        self.signatures = {
            "predict_pixels": lambda pixels: {"probabilities": tf.constant(pixels_probs)},
            "serving_default": lambda image_bytes: {
                "probabilities": tf.constant(bytes_probs[:len(image_bytes)])}}


def test_package_refuses_a_saved_model_that_does_not_answer_as_keras(tmp_path):
    from imgclf.export.formats import checked_saved_model

    (tmp_path / "saved_model").mkdir()
    files = []
    for i in range(10):
        files.append(str(tmp_path / f"{i}.jpg"))
        Path(files[-1]).write_bytes(b"image")
    pixels = np.zeros((10, 75, 75, 3), np.float32)
    keras_probs = np.eye(3, dtype=np.float32)[np.arange(10) % 3] * 0.9 + 0.1 / 3  # decided
    wrong = np.roll(keras_probs, 1, axis=1)

    check = checked_saved_model(_FakeSavedModel(keras_probs, keras_probs), tmp_path /
                                "saved_model", files, pixels, keras_probs)
    assert check["bytes_signature_top1_agreement"] == 1.0
    assert check["bytes_signature_images_counted"] == 10
    with pytest.raises(RuntimeError, match="pixels signature differs"):
        checked_saved_model(_FakeSavedModel(keras_probs + 1e-3, keras_probs),
                            tmp_path / "saved_model", files, pixels, keras_probs)
    # One image of ten decoded differently by TensorFlow: 90% < 99%.
    bytes_probs = keras_probs.copy()
    bytes_probs[4] = wrong[4]
    with pytest.raises(RuntimeError, match="image-bytes signature agrees .* 0.9 <"):
        checked_saved_model(_FakeSavedModel(keras_probs, bytes_probs),
                            tmp_path / "saved_model", files, pixels, keras_probs)


def test_package_checks_copies_on_stored_answers_and_refuses_another_trainings(
        trained_project, tmp_path):
    import os
    import shutil

    from imgclf.errors import UserError
    from imgclf.export.formats import check_trained_answers
    from imgclf.serving.batches import iter_batches
    from imgclf.serving.runners import load_keras_file
    from imgclf.training.embeddings import stored_answers

    # package checks the serving copies against the Keras model's answers that train stored
    # (models/embeddings.npz) instead of running the model again: its probabilities and
    # pooled features on the validation and training images, from the stored activations:
    # the model's own answers, up to the activations' float16.
    rows = (trained_project / "data/prepared/train.csv").read_text().splitlines()[1:]
    train = [str(trained_project / line.split(",")[0]) for line in rows]
    probs, features = stored_answers(trained_project / "models/embeddings.npz",
                                     {"train": len(train)})["train"]
    keras_model = load_keras_file(trained_project / "models/model.keras",
                                  trained_project / "data/prepared/classes.json", None, "crop")
    pixels = np.concatenate([p for _, p, _ in iter_batches(train, 75, "crop", 32)])
    np.testing.assert_allclose(probs, keras_model.predict(pixels), atol=2e-3)
    assert features.shape == (len(train), 1536)

    project = tmp_path / "project"
    shutil.copytree(trained_project, project, symlinks=True,
                    copy_function=lambda src, dst: (shutil.copy2 if src.endswith(".db")
                                                    else os.link)(src, dst))
    stored = project / "models/embeddings.npz"
    with np.load(stored) as arrays:
        original = {k: arrays[k] for k in arrays.files}
    saved_model = project / "models/saved_model/saved_model.pb"
    before = saved_model.stat().st_mtime_ns
    for split in ("val", "train"):
        keys = [f"{split}_probs", f"{split}_features", f"{split}_labels"]
        kept = {**original, **{k: original[k][1:] for k in keys}}  # one image's row missing
        stored.unlink()  # a link to the session's project: replaced, not written through
        np.savez(stored, **kept)
        result = run_module("stages.package", project)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "models/embeddings.npz" in result.stderr and f" {split} " in result.stderr
        assert "Traceback" not in result.stderr
        assert saved_model.stat().st_mtime_ns == before  # refused before anything was written

    # Answers of another model on the right images: the few images the traced graph runs
    # on (the SavedModel's check) give the model's own answers to compare them with.
    probs = np.eye(3, dtype=np.float32)[np.arange(8) % 3] * 0.9 + 0.1 / 3  # decided
    features = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    check_trained_answers(probs, features, probs, features + 1e-4)  # round-off passes
    with pytest.raises(UserError, match="embeddings.npz does not hold the answers"):
        check_trained_answers(probs, features, np.roll(probs, 1, axis=1), features)
    with pytest.raises(UserError, match="smallest cosine"):
        check_trained_answers(probs, features, probs, -features)


def test_package_says_what_its_image_bytes_check_compared():
    from imgclf.export.formats import package_summary

    check = {"max_abs_diff": 0.0, "bytes_signature_top1_agreement": 1.0,
             "bytes_signature_images_counted": 0}
    candidate = {"size_mb": 55.3, "images_per_s": 120.0, "top1_agreement": 0.99,
                 "checked_images": 256, "features_min_cosine": 0.9995, "agrees": True,
                 "precision": None}
    # A random-init model: every image a close call, so nothing was compared.
    header, line = package_summary(check, {"tflite_dynamic": candidate}).splitlines()
    assert "image-bytes signature not compared" in header and "agrees on" not in header
    assert line.split() == ["tflite_dynamic", "55.3", "MB", "120.0", "img/s", "99.0%", "of",
                            "256", "cosine", "0.99950"]
    check.update(bytes_signature_top1_agreement=0.9, bytes_signature_images_counted=10)
    assert "image-bytes signature agrees on 90.0% of 10 images" in package_summary(check, {})
