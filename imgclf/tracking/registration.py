"""The `register` stage's work: the trained model logged to its training run as an MLflow
pyfunc over image files (with the package stage's serving copy when it computes with it)
and registered as a new version of `mlflow.model_name`.

Registration is its own stage so that a registration param, the serving code or the model
card's wording re-registers the model without retraining it. It is idempotent: the logged
model and the version carry a key of what they hold (the model file's weights, the serving
params and code), and a rerun that finds them reuses them, so a stage killed after MLflow
registered but before its report was written does not register the same model twice.
"""

from __future__ import annotations

import base64
import hashlib
import io as stdio
import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from imgclf import io, paths
from imgclf.cards import model_card
from imgclf.data.manifests import data_version
from imgclf.errors import UserError
from imgclf.metrics import FEATURES_MIN_COSINE, QUANTISED_MIN_AGREEMENT
from imgclf.params import Params
from imgclf.stage_reports import PackageReport, RegisterReport, SelectiveReport, TrainReport
from imgclf.tracking import store

PACKAGE = Path(__file__).resolve().parents[1]  # imgclf/
# What the registered model carries as its code: the pyfunc, the runners and the decode
# rules, nothing of training. Paths relative to the package folder.
SERVING_CODE = ("__init__.py", "_quiet.py", "errors.py", "serving", "data/__init__.py",
                "data/images.py", "model/__init__.py", "model/selective.py")


def serving_code(folder: Path) -> Path:
    """A copy of the package holding only SERVING_CODE, in `folder`/imgclf."""
    target = folder / PACKAGE.name
    for rel in SERVING_CODE:
        source = PACKAGE / rel
        if source.is_dir():
            shutil.copytree(source, target / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    return target


def _pin(name: str) -> str:
    return f"{name}=={version(name)}"


def tensorflow_version() -> str:
    """TensorFlow's version, whichever distribution is installed: tensorflow-cpu here, the
    tensorflow wheel on CUDA images (both have the same version numbers)."""
    for name in ("tensorflow-cpu", "tensorflow"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    raise PackageNotFoundError("tensorflow")


def requirements(serving_format: str) -> list[str]:
    """Exactly what the serving code imports, pinned as installed here. A TFLite-served model
    runs on LiteRT and needs no TensorFlow; a Keras-served one declares `tensorflow`, which
    installs on any machine (CPU or CUDA) where `tensorflow-cpu` would not on a GPU one."""
    # mlflow-skinny: the pyfunc loader and the scoring server (FastAPI, uvicorn), without the
    # tracking server, UI and ML libraries of `mlflow` (`make bench`: served_environment_mb).
    pins = [_pin(name) for name in ("mlflow-skinny", "numpy", "pandas", "pillow")]
    if serving_format.startswith("tflite"):
        return [*pins, _pin("ai-edge-litert")]
    if serving_format.startswith("openvino"):
        return [*pins, _pin("openvino")]
    return [*pins, f"tensorflow=={tensorflow_version()}", _pin("keras")]


def input_example(params: Params) -> str:
    """A real training image as a client sends it (base64 PNG bytes), kept small."""
    from PIL import Image

    from imgclf.data.images import load_pixels
    from imgclf.data.manifests import read_classes, read_manifest

    files, _ = read_manifest("val", read_classes())
    pixels = load_pixels(files[0], min(params.model.image_size, 96), params.model.resize)
    buffer = stdio.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serving_format(params: Params, package: PackageReport) -> tuple[str, dict[str, float]]:
    """What the registered model computes with (`mlflow.serving_format`), and the images/s
    that chose it: with `auto`, the fastest of the package stage's candidates that agrees
    with Keras (package timed them all on its machine and checked them fastest first, so at
    most one agrees; Keras when none does); a named format as it is."""
    wanted = params.mlflow.serving_format
    if wanted == "keras":
        return "keras", {}
    if wanted != "auto":
        if wanted not in package.candidates:
            raise UserError(f"mlflow.serving_format = {wanted}: the package stage made no "
                            f"such copy (package.openvino = {params.package.openvino}); "
                            f"allowed here: auto, keras, {', '.join(package.candidates)}")
        return wanted, {}
    passing = package.passing()
    if not passing:
        return "keras", {}
    speeds = {fmt: c["images_per_s"] for fmt, c in package.candidates.items()}
    return max(passing, key=speeds.get), (speeds if len(speeds) > 1 else {})


SIGNATURE_PARAMS = (("top_k", "long", 5), ("probabilities", "boolean", False),
                    ("tta", "boolean", False), ("scores", "boolean", False),
                    ("reject_unreadable", "boolean", True))
# The tag on the logged model and on the version naming what they hold (registration_key).
KEY_TAG = "imgclf.registration"
REASON_TAG = "serving_reason"  # why the version serves with its format, in a sentence
SPEEDS_TAG = "serving_speeds"  # JSON: the images/s that chose it ({} when no choice was made)


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec("string", "top_k"), ColSpec("string", "status", required=False),
                        ColSpec("double", "ood_score", required=False),
                        ColSpec("string", "error"),
                        ColSpec("string", "probabilities", required=False),
                        ColSpec("string", "scores", required=False)]),
        params=ParamSchema([ParamSpec(*spec) for spec in SIGNATURE_PARAMS]),
    )


def registration_key(params: Params, weights_digest: str, package: PackageReport) -> str:
    """What a registered version holds: the model file's weights, its selective scores and
    thresholds, the params that shape its serving, the copies it may serve with, and the
    serving code it carries. Equal keys, equal registered models."""
    selective = hashlib.sha256(paths.SELECTIVE.read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(
        {"weights": weights_digest, "selective": selective, "name": params.mlflow.model_name,
         "format": params.mlflow.serving_format, "candidates": package.passing(),
         "image_size": params.model.image_size, "resize": params.model.resize,
         "max_pixels": params.prepare.max_pixels}, sort_keys=True).encode())
    for rel in SERVING_CODE:
        source = PACKAGE / rel
        for file in sorted(source.rglob("*.py")) if source.is_dir() else [source]:
            digest.update(file.relative_to(PACKAGE).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _registered_version(client, name: str, run_id: str, key: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' AND run_id='{run_id}'")
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    found = [v for v in versions if v.tags.get(KEY_TAG) == key]
    return max(found, key=lambda v: int(v.version)) if found else None


def _logged_model(client, run_id: str, key: str):
    """The model this run already logged with `key` (a stage killed before registering it)."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND "
        f"tags.`{KEY_TAG}` = '{key}'")
    # READY only: one whose upload a kill cut short stays PENDING and is not reused.
    return next((m for m in found if m.status == LoggedModelStatus.READY), None)


KERAS_ARTIFACT = "keras"  # the run's artifact folder holding model.keras


def _keras_artifact(run_id: str) -> str:
    """The run's copy of models/model.keras, logged once per run (a run trains one model;
    a second registration of it, or a rerun after a kill, finds it there); its URI."""
    client = store.make_client()
    size = paths.MODEL_FILE.stat().st_size
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id, KERAS_ARTIFACT)}
    if logged.get(f"{KERAS_ARTIFACT}/{paths.MODEL_FILE.name}") != size:
        client.log_artifact(run_id, str(paths.MODEL_FILE), artifact_path=KERAS_ARTIFACT)
    return f"runs:/{run_id}/{KERAS_ARTIFACT}/{paths.MODEL_FILE.name}"


def _log_model(run_id: str, params: Params, key: str, folder: Path,
               serving_format: str, choice: dict[str, str]) -> str:
    """The pyfunc logged to the training run; its model URI (`models:/m-...`). `choice`: the
    tags that say why it serves with `serving_format`."""
    import mlflow
    import pandas as pd

    config = {"image_size": params.model.image_size, "resize": params.model.resize,
              "max_pixels": params.prepare.max_pixels, "format": serving_format}
    if serving_format == "keras":
        served = {"keras_model": str(paths.MODEL_FILE)}
    else:
        # What a deployment downloads is what it serves with: the TFLite or OpenVINO copy.
        # The Keras model stays an artifact of the run, fetched only by what needs it
        # (`imgclf predict --exact`, evaluate with TTA).
        served = {"served_model": str(paths.SERVING_FORMATS[serving_format])}
        config["keras_model_uri"] = _keras_artifact(run_id)
    (folder / "config.json").write_text(json.dumps(config))
    code = serving_code(folder / "code")
    store.use_fluent()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / "serving" / "model_code.py"),
            artifacts={"classes": str(paths.CLASSES_JSON), "config": str(folder / "config.json"),
                       "selective": str(paths.SELECTIVE), **served},
            code_paths=[str(code)],
            signature=_signature(),
            input_example=pd.DataFrame({"image": [input_example(params)]}),
            pip_requirements=requirements(serving_format),
            tags={KEY_TAG: key, "serving_format": serving_format, **choice},
        )
    return info.model_uri


def register(client, params: Params, trained: TrainReport,
             package: PackageReport) -> RegisterReport:
    """Log and register the model train wrote, with the package stage's serving copy, or
    find the version a killed rerun already made; the version's model card."""
    import mlflow

    run_id, name = trained.run_id, params.mlflow.model_name
    key = registration_key(params, trained.weights_digest, package)
    version = _registered_version(client, name, run_id, key)
    if version is not None:
        # Its card stays as evaluate completed it.
        print(f"register: {name} version {version.version} already holds this model "
              "(same weights, serving params and code): reused, not registered again")
        return _report(run_id, name, version, key, trained.weights_digest)
    for fmt, candidate in package.candidates.items():  # once per run; those checked
        metric = f"serving_top1_agreement.{fmt}"
        if candidate["checked_images"] and not client.get_metric_history(run_id, metric):
            client.log_metric(run_id, metric, candidate["top1_agreement"])
    logged = _logged_model(client, run_id, key)
    if logged is None:
        fmt, speeds = serving_format(params, package)
        why = _why(fmt, params, package, speeds)
        print(f"register: serving with {fmt} ({why})")
        choice = {REASON_TAG: why, SPEEDS_TAG: json.dumps(speeds)}
        with tempfile.TemporaryDirectory() as tmp:
            model_uri = _log_model(run_id, params, key, Path(tmp), fmt, choice)
    else:  # logged by a register killed before it registered
        model_uri, fmt = f"models:/{logged.model_id}", logged.tags["serving_format"]
        choice = {tag: logged.tags[tag] for tag in (REASON_TAG, SPEEDS_TAG)}
    io.fault_point("logged", "model")  # the kill tests: logged, not yet registered
    store.use_fluent()
    version = mlflow.register_model(model_uri, name,
                                    tags={KEY_TAG: key, "serving_format": fmt, **choice})
    # The card without its test section until evaluate measures the served model.
    card = model_card(params, data_version(), io.read_json(paths.PREPARE_REPORT), trained,
                      selective=SelectiveReport.read(), served_format=fmt,
                      serving_reason=choice[REASON_TAG])
    client.update_model_version(name, str(version.version), description=card)
    return _report(run_id, name, client.get_model_version(name, str(version.version)), key,
                   trained.weights_digest)


def _why(fmt: str, params: Params, package: PackageReport, speeds: dict[str, float]) -> str:
    """Why the version serves with `fmt`, in a sentence (the stage's output, the model card)."""
    if params.mlflow.serving_format != "auto":
        return f"mlflow.serving_format = {params.mlflow.serving_format}"
    checked = ", ".join(f"{f} {c['top1_agreement']:.1%} / {c['features_min_cosine']:.4f}"
                        for f, c in package.candidates.items() if c["checked_images"])
    gate = (f"against Keras on validation (and training) images, decided top-1 agreement / "
            f"smallest cosine of the pooled features: {checked}; at least "
            f"{QUANTISED_MIN_AGREEMENT:.0%} / {FEATURES_MIN_COSINE} may serve")
    if fmt == "keras":
        return f"no copy agrees with Keras well enough ({gate})"
    if not speeds:
        return f"the only copy made, and it agrees with Keras ({gate})"
    timed = ", ".join(f"{f} {v:.1f}" for f, v in sorted(speeds.items(), key=lambda x: -x[1]))
    return (f"the fastest copy that agrees, in images/s on the machine that ran package: "
            f"{timed}; checked fastest first, the slower ones not once one agreed ({gate})")


def _report(run_id: str, name: str, version, key: str, weights_digest: str) -> RegisterReport:
    return RegisterReport(run_id=run_id, model_uri=version.source, registered_model=name,
                          model_version=int(version.version),
                          serving_format=version.tags["serving_format"],
                          registration_key=key, weights_digest=weights_digest,
                          serving_reason=version.tags.get(REASON_TAG, ""),
                          serving_speeds=json.loads(version.tags.get(SPEEDS_TAG, "{}")))
