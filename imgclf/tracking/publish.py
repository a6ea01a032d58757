"""What a finished training sends MLflow: the epochs it missed, its artifacts, the model (an
MLflow pyfunc over image files) and its registered version.

A tracking server that does not answer leaves models/mlflow_pending.json; `imgclf relog` (or
the next `dvc repro`, which finds it) sends the rest, with nothing lost and nothing twice.
"""

from __future__ import annotations

import base64
import io as stdio
import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from imgclf import io, paths
from imgclf.cards import model_card
from imgclf.errors import ServiceLost, UserError
from imgclf.params import Params, load_params
from imgclf.tracking import store
from imgclf.tracking.runs import EpochLog, first_line
from imgclf.tracking.store import TRACKING_ERRORS

PACKAGE = Path(__file__).resolve().parents[1]  # imgclf/
# What the registered model carries as its code: the pyfunc, the runners and the decode
# rules, nothing of training. Paths relative to the package folder.
SERVING_CODE = ("__init__.py", "_quiet.py", "errors.py", "serving", "data/__init__.py",
                "data/images.py")


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
    # tracking server, UI and ML libraries of `mlflow` (258 MB of environment, not 686 MB).
    pins = [_pin(name) for name in ("mlflow-skinny", "numpy", "pandas", "pillow")]
    if serving_format.startswith("tflite"):
        return [*pins, _pin("ai-edge-litert")]
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


def serving_artifacts(client, run_id: str, params: Params, folder: Path,
                      model=None) -> tuple[dict, str]:
    """(extra pyfunc artifacts, the format serving computes with) for mlflow.serving_format:
    with `auto`, a dynamic-range TFLite copy when it agrees with Keras on enough validation
    images (top-1, logged as `serving_top1_agreement`). `model`: the saved model when the
    caller holds it (train does: loading 200 MB again would cost seconds for nothing)."""
    if params.mlflow.serving_format == "keras":
        return {}, "keras"
    import keras
    import numpy as np

    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.model.formats import SERVING_SAMPLE, SERVING_VARIANT, serving_copy
    from imgclf.serving.batches import iter_batches

    files, _ = read_manifest("val", read_classes())
    # Evenly spaced through the manifest (sorted by class), so every class is sampled.
    picked = sorted(set(np.linspace(0, len(files) - 1, SERVING_SAMPLE).round().astype(int)))
    pixels = np.concatenate([p for _good, p, _bad in iter_batches(
        [files[i] for i in picked], params.model.image_size, params.model.resize, 32)])
    if model is None:
        model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
    path, agreement = serving_copy(model, pixels, folder)
    client.log_metric(run_id, "serving_top1_agreement", agreement)
    fmt = f"tflite_{SERVING_VARIANT}" if path else "keras"
    print(f"train: serving with {fmt} (the TFLite copy agrees with Keras on "
          f"{agreement:.1%} of {len(pixels)} validation images)")
    return ({"tflite_model": str(path)} if path else {}), fmt


def log_model(client, run_id: str, params: Params, timings: dict,
              calibration: dict | None = None, model=None) -> dict:
    """Artifacts and timings to the run; the pyfunc logged and registered as a new version."""
    import mlflow
    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    for path in (paths.TRAIN_HISTORY, paths.CLASSES_JSON, paths.TRAIN_METRICS):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    for key, value in timings.items():
        client.log_metric(run_id, key, value)
    for key, value in (calibration or {}).items():
        client.log_metric(run_id, f"calibration_{key}", value)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec("string", "top_k"), ColSpec("string", "error"),
                        ColSpec("string", "probabilities", required=False)]),
        params=ParamSchema([ParamSpec("top_k", "long", 5),
                            ParamSpec("probabilities", "boolean", False),
                            ParamSpec("tta", "boolean", False)]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        extra, serving_format = serving_artifacts(client, run_id, params, Path(tmp), model)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"image_size": params.model.image_size,
                                      "resize": params.model.resize,
                                      "max_pixels": params.prepare.max_pixels,
                                      "format": serving_format}))
        code = serving_code(Path(tmp) / "code")
        store.use_fluent()
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code / "serving" / "model_code.py"),
                artifacts={"keras_model": str(paths.MODEL_FILE),
                           "classes": str(paths.CLASSES_JSON), "config": str(config), **extra},
                code_paths=[str(code)],
                signature=signature,
                input_example=pd.DataFrame({"image": [input_example(params)]}),
                registered_model_name=params.mlflow.model_name,
                pip_requirements=requirements(serving_format),
            )
    return {"model_uri": info.model_uri, "version": info.registered_model_version}


def publish(client, params: Params, pending: dict, model=None) -> dict:
    """Send MLflow what a finished training has on disk (`pending`; `model`: the model file's
    model, when in memory), then write reports/train.json. A server that does not answer
    leaves models/mlflow_pending.json."""
    run_id = pending["run_id"]
    try:
        if pending["first_unsent_epoch"] is not None:
            EpochLog(client, run_id).send([r for r in pending["history"]
                                           if r["epoch"] >= pending["first_unsent_epoch"]])
            pending = {**pending, "first_unsent_epoch": None}
        model_info = log_model(client, run_id, params, pending["timings"],
                               pending["outputs"].get("calibration"), model)
        # The card without its test section until evaluate measures the served model.
        card = model_card(params, store.data_version(), io.read_json(paths.PREPARE_REPORT),
                          pending["outputs"])
        client.update_model_version(params.mlflow.model_name, str(model_info["version"]),
                                    description=card)
    except TRACKING_ERRORS as err:
        io.write_json(paths.MLFLOW_PENDING, pending)
        raise ServiceLost(
            f"MLflow tracking server {store.tracking_uri()} was lost ({first_line(err)}). "
            f"Training finished and nothing is lost: the model is in {paths.MODEL_FILE}, "
            f"metrics and history in {paths.TRAIN_METRICS} and {paths.TRAIN_HISTORY}, and what "
            f"MLflow run {run_id} still needs in {paths.MLFLOW_PENDING}. When the server is "
            "back, run `imgclf relog` (or `dvc repro`, which relogs instead of retraining)"
        ) from None
    report = {"run_id": run_id, "model_uri": model_info["model_uri"],
              "registered_model": params.mlflow.model_name,
              "model_version": model_info["version"], **pending["outputs"]}
    io.write_json(paths.TRAIN_REPORT, report)
    paths.MLFLOW_PENDING.unlink(missing_ok=True)
    return report


def read_pending(params: Params) -> dict | None:
    """The pending MLflow logging of a finished training with these params and data."""
    from imgclf.training import resume

    if not paths.MLFLOW_PENDING.is_file() or not paths.MODEL_FILE.is_file():
        return None
    pending = json.loads(paths.MLFLOW_PENDING.read_text(encoding="utf-8"))
    if pending.get("fingerprint") != resume.fingerprint(params.flat(), store.data_version()):
        return None
    return pending


def relog() -> dict:
    """`imgclf relog`: send the MLflow run what a training kept on disk while its tracking
    server was lost (models/mlflow_pending.json), with nothing lost and nothing sent twice."""
    params = load_params()
    if not paths.MLFLOW_PENDING.is_file():
        raise UserError(f"nothing to relog: {paths.MLFLOW_PENDING} does not exist (every "
                        "finished training here has reached MLflow)")
    pending = read_pending(params)
    if pending is None:
        raise UserError(f"{paths.MLFLOW_PENDING} belongs to another training than params.yaml, "
                        f"data/prepared and {paths.MODEL_FILE} now hold; restore them (git "
                        "checkout, dvc checkout) and run `imgclf relog` again")
    store.check_reachable()
    report = publish(store.make_client(), params, pending)
    print(f"relog: MLflow run {report['run_id']} complete; registered "
          f"{report['registered_model']} version {report['model_version']}. If the train "
          "stage ended with this error under DVC, `dvc commit train` records it as done.")
    return report
