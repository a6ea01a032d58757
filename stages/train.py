"""DVC stage `train`: two-phase fine-tuning, tracked in MLflow, the model registered.

Reads params sections model, augment, train, mlflow (and prepare.max_pixels for serving).
Writes models/model.keras, reports/train.json, reports/train_metrics.json,
reports/plots/train_history.csv and reports/train_curves.png. An interrupted run resumes
from its last completed epoch (models/checkpoints/last/) into the same MLflow run.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from stages import atomic, paths
from stages.errors import ServiceLost, UserError, exits_cleanly
from stages.params import Params, load_params


def _keras_setup(params: Params) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(params.train.seed)
    if params.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_precision(params.train.precision)


def set_precision(precision: str) -> None:
    """Keras mixed precision; float16 only where it is fast and supported: NVIDIA GPUs."""
    import keras
    import tensorflow as tf

    if precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise UserError("train.precision = 'mixed_float16' needs a GPU (none found): use "
                        "float32, or mixed_bfloat16 on CPUs with AVX-512 BF16")
    keras.mixed_precision.set_global_policy(precision)


def make_data(params: Params, classes: list[str]):
    import keras

    from stages.augment import augmenter
    from stages.inputs import image_dataset, read_manifest
    from stages.training import Data, seed_states

    train_files, train_labels = read_manifest("train", classes)
    val_files, val_labels = read_manifest("val", classes)
    order = keras.random.SeedGenerator(params.train.seed)
    augmenters: dict[int, object] = {}

    def make_images(files, labels, shuffle, augment_seed, batch_size=None):
        aug = None
        if augment_seed is not None:
            if augment_seed not in augmenters:
                augmenters[augment_seed] = augmenter(params.augment, augment_seed)
            aug = augmenters[augment_seed]
        return image_dataset(files, labels, len(classes), params.model.image_size,
                             params.model.resize, batch_size or params.train.batch_size,
                             order=order if shuffle else None, augmenter=aug)

    def random_states():
        return seed_states(order, *[a for a in augmenters.values() if a is not None])

    return Data(train_files, train_labels, val_files, val_labels, len(classes), make_images,
                random_states)


def float32_copy(classifier, params: Params, num_classes: int):
    """The trained model rebuilt under the float32 policy, holding the same weights (mixed
    precision keeps its variables in float32 already). Mixed precision is a training
    speed-up; the model that ships computes in float32, so evaluation, export and serving
    give the same answers on every machine, bf16 hardware or not."""
    import keras

    from stages.model import build_classifier

    keras.mixed_precision.set_global_policy("float32")
    shipped = build_classifier(params.model, num_classes, None, seed=params.train.seed)
    shipped.model.set_weights(classifier.model.get_weights())
    return shipped


def save_keras_atomic(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    model.save(tmp)
    os.replace(tmp, path)


def _metrics_of(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items()
            if isinstance(v, float) and k not in ("epoch_seconds",) and v == v}


def start_or_resume_run(client, params: Params, saved) -> tuple[str, bool]:
    """(run_id, resumed). A resumed training continues in its own MLflow run."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from stages import tracking

    if saved is not None and saved.run_id:
        try:
            client.get_run(saved.run_id)
            client.update_run(saved.run_id, status="RUNNING")
            return saved.run_id, True
        except MlflowException:
            pass
    experiment_id = tracking.ensure_experiment(client, params.mlflow.experiment)
    commit, dirty = tracking.git_state()
    run = client.create_run(experiment_id, run_name=tracking.run_name(commit),
                            tags=tracking.run_tags(commit, dirty))
    flat = params.flat()
    items = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id, False


def worker_dir(role, fp: str) -> Path:
    """A non-chief worker's own checkpoint folder: outside the project (only the chief writes
    there), and stable across restarts so that a restarted worker resumes with the chief."""
    return Path(tempfile.gettempdir()) / f"imgclf-worker{role.index}-{fp}"


def weights_digest(model) -> str:
    """A short hash of every weight: replicas that trained in sync print the same one."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def train_and_track(params: Params, client, weights: str | None, strategy=None,
                    role=None) -> dict:
    """Build, train both phases (resuming if possible), write outputs, log to MLflow.

    Under a multi-worker strategy every worker calls this; only the chief (`role.is_chief`)
    gets a `client`, writes the stage's outputs and logs.
    """
    import keras  # noqa: F401  (import after param validation: TF start-up takes seconds)
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    if role is None:
        from stages.distribute import Role

        role = Role("none")
    with contextlib.ExitStack() as strategy_scope:
        strategy_scope.enter_context(strategy.scope())
        return _train(params, client, weights, role, strategy_scope)


def _train(params: Params, client, weights: str | None, role, strategy_scope) -> dict:
    from stages import resume, tracking
    from stages.inputs import read_classes
    from stages.model import build_classifier
    from stages.training import (
        Tracker,
        TrackerState,
        finish,
        optimizer_state,
        run_finetune_phase,
        run_head_phase,
        start_finetune,
    )

    _keras_setup(params)
    classes = read_classes()
    data = make_data(params, classes)
    classifier = build_classifier(params.model, len(classes), weights, seed=params.train.seed)
    fp = resume.fingerprint(params.flat(), tracking.data_version())
    checkpoints = paths.CHECKPOINTS_DIR if role.is_chief else worker_dir(role, fp)
    resume_dir = checkpoints / paths.RESUME_DIR.name
    saved = resume.load(resume_dir, fp) if params.train.resume else None
    if saved is not None:
        try:
            classifier.model.load_weights(saved.weights)
        except (OSError, ValueError, KeyError) as err:
            # A checkpoint damaged on disk (the state itself is written atomically): the
            # epochs are lost, the run is not; start clean rather than train on garbage.
            print(f"warning: resume checkpoint {saved.weights} is unreadable ({err}); "
                  "training starts from scratch", file=sys.stderr)
            saved = None
    if role.is_chief:
        run_id, resumed = start_or_resume_run(client, params, saved)
    else:
        run_id, resumed = None, saved is not None
    state = TrackerState()
    if resumed:
        state = saved.state
        print(f"train: resuming MLflow run {run_id} after epoch {state.epochs_done} "
              f"({state.phase} phase)")
    checkpoints.mkdir(parents=True, exist_ok=True)

    log_epoch = EpochLog(client, run_id)

    def save_resume_state(row, tracker):
        resume.save(resume_dir, classifier.model, optimizer_state(tracker.optimizer),
                    tracker.state, fp, run_id,
                    same_weights_as=tracker.best_weights_path if row["best"] else None)

    hooks = [log_epoch, save_resume_state] if role.is_chief else [save_resume_state]
    tracker = Tracker(classifier, state, params.train.monitor,
                      params.train.early_stopping_patience,
                      checkpoints / paths.BEST_WEIGHTS.name, hooks=hooks)
    timings: dict = {}
    # The phase the saved optimizer belongs to, read now: `state` moves on to "finetune".
    saved_phase = state.phase if resumed else None
    try:
        if state.phase == "head":
            arrays = saved.optimizer_arrays if saved_phase == "head" else None
            run_head_phase(classifier, tracker=tracker, data=data, train=params.train,
                           optimizer_arrays=arrays, timings=timings)
            start_finetune(classifier, tracker)
            best = tracker.best_weights_path if state.best_epoch is not None else None
            resume.save(resume_dir, classifier.model, None, state, fp, run_id,
                        same_weights_as=best)  # phase 2 starts from the best weights
        if state.phase == "finetune":
            arrays = saved.optimizer_arrays if saved_phase == "finetune" else None
            run_finetune_phase(classifier, data, params.train, tracker, optimizer_arrays=arrays)
        finish(classifier, tracker)
    except BaseException:
        if role.is_chief:
            from stages.tracking import TRACKING_ERRORS

            with contextlib.suppress(*TRACKING_ERRORS):
                client.set_terminated(run_id, status="KILLED")
        raise
    # Saving and MLflow's model check run outside the strategy: under a multi-worker one, a
    # variable created now would wait forever for workers that have already finished.
    strategy_scope.close()
    if params.train.precision != "float32":
        classifier = float32_copy(classifier, params, len(classes))
    digest = weights_digest(classifier.model)
    print(f"train: worker {role.index} of {role.num_workers} finished; weights digest {digest}")
    if not role.is_chief:
        shutil.rmtree(checkpoints, ignore_errors=True)
        return {"weights_digest": digest, "worker": role.index}
    save_keras_atomic(classifier.model, paths.MODEL_FILE)
    outputs = write_outputs(params, state, timings)
    outputs.update(strategy=role.strategy_name, workers=role.num_workers, weights_digest=digest)
    # Everything MLflow still has to receive, on disk before the first call that could fail:
    # a server lost now (or a kill) costs a `relog`, never the training.
    pending = {"run_id": run_id, "fingerprint": fp, "first_unsent_epoch": log_epoch.first_unsent,
               "history": state.history, "timings": timings, "outputs": outputs}
    atomic.write_json(paths.MLFLOW_PENDING, pending)
    shutil.rmtree(resume_dir, ignore_errors=True)
    return publish(client, params, classes, pending)


class EpochLog:
    """Per-epoch metrics to the MLflow run. A tracking server lost mid-run stops the logging,
    never the training: the epochs not sent stay in the history for `publish` to send."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.first_unsent: int | None = None

    def __call__(self, row: dict, tracker=None) -> None:
        from stages.tracking import TRACKING_ERRORS

        if self.first_unsent is not None:
            return
        try:
            self.send([row])
        except TRACKING_ERRORS as err:
            self.first_unsent = row["epoch"]
            print(f"warning: MLflow tracking server lost at epoch {row['epoch']} "
                  f"({_first_line(err)}); training goes on and keeps everything on disk",
                  file=sys.stderr)

    def send(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, r["epoch"]) for r in rows for k, v in _metrics_of(r).items()]
        for start in range(0, len(metrics), 1000):  # the REST API's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def publish(client, params: Params, classes: list[str], pending: dict) -> dict:
    """Send MLflow what a finished training has on disk: the epochs it missed, artifacts,
    model and registered version; then write reports/train.json. A tracking server that does
    not answer leaves models/mlflow_pending.json for `imgclf relog` (or the next `dvc repro`).
    """
    from stages import tracking
    from stages.tracking import TRACKING_ERRORS

    run_id = pending["run_id"]
    try:
        if pending["first_unsent_epoch"] is not None:
            EpochLog(client, run_id).send([r for r in pending["history"]
                                           if r["epoch"] >= pending["first_unsent_epoch"]])
            pending = {**pending, "first_unsent_epoch": None}
        model_info = log_to_mlflow(client, run_id, params, classes, pending["timings"])
    except TRACKING_ERRORS as err:
        atomic.write_json(paths.MLFLOW_PENDING, pending)
        raise ServiceLost(
            f"MLflow tracking server {tracking.tracking_uri()} was lost ({_first_line(err)}). "
            f"Training finished and nothing is lost: the model is in {paths.MODEL_FILE}, "
            f"metrics and history in {paths.TRAIN_METRICS} and {paths.TRAIN_HISTORY}, and what "
            f"MLflow run {run_id} still needs in {paths.MLFLOW_PENDING}. When the server is "
            "back, run `imgclf relog` (or `dvc repro`, which relogs instead of retraining)"
        ) from None
    report = {"run_id": run_id, "model_uri": model_info["model_uri"],
              "registered_model": params.mlflow.model_name,
              "model_version": model_info["version"], **pending["outputs"]}
    atomic.write_json(paths.TRAIN_REPORT, report)
    paths.MLFLOW_PENDING.unlink(missing_ok=True)
    return report


def read_pending(params: Params) -> dict | None:
    """The pending MLflow logging of a finished training with these params and data."""
    from stages import resume, tracking

    if not paths.MLFLOW_PENDING.is_file() or not paths.MODEL_FILE.is_file():
        return None
    pending = json.loads(paths.MLFLOW_PENDING.read_text(encoding="utf-8"))
    if pending.get("fingerprint") != resume.fingerprint(params.flat(), tracking.data_version()):
        return None
    return pending


def write_outputs(params: Params, state, timings: dict) -> dict:
    import pandas as pd

    from stages.plots import training_curves

    atomic.write_csv(paths.TRAIN_HISTORY, pd.DataFrame(state.history))
    atomic.write_bytes(paths.TRAIN_CURVES, training_curves(state.history))
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    metrics = {"best_epoch": state.best_epoch, "epochs_run": state.epochs_done,
               **({k: round(v, 6) for k, v in _metrics_of(best).items()} if best else {})}
    metrics.pop("learning_rate", None)
    atomic.write_json(paths.TRAIN_METRICS, metrics)
    return {"best_epoch": state.best_epoch, "monitor": params.train.monitor,
            "best_value": state.best, "epochs_run": state.epochs_done,
            "head_epochs_run": state.head_epochs_run,
            "epoch_seconds": [r["epoch_seconds"] for r in state.history], **timings}


def input_example(params: Params) -> str:
    """A real training image as a client sends it (base64 PNG bytes), kept small."""
    from PIL import Image

    from stages.images import load_pixels
    from stages.inputs import read_classes, read_manifest

    files, _ = read_manifest("val", read_classes())
    pixels = load_pixels(files[0], min(params.model.image_size, 96), params.model.resize)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serving_artifacts(client, run_id: str, params: Params, folder: Path) -> tuple[dict, str]:
    """(extra pyfunc artifacts, the format serving computes with) for mlflow.serving_format:
    with `auto`, a dynamic-range TFLite copy when it agrees with Keras on enough validation
    images (top-1, logged as `serving_top1_agreement`)."""
    if params.mlflow.serving_format == "keras":
        return {}, "keras"
    import keras
    import numpy as np

    from stages.exporting import SERVING_SAMPLE, SERVING_VARIANT, serving_copy
    from stages.inputs import read_classes, read_manifest
    from stages.predicting import iter_batches

    files, _ = read_manifest("val", read_classes())
    # Evenly spaced through the manifest (sorted by class), so every class is sampled.
    picked = sorted(set(np.linspace(0, len(files) - 1, SERVING_SAMPLE).round().astype(int)))
    pixels = np.concatenate([p for _good, p, _bad in iter_batches(
        [files[i] for i in picked], params.model.image_size, params.model.resize, 32)])
    model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
    path, agreement = serving_copy(model, pixels, folder)
    client.log_metric(run_id, "serving_top1_agreement", agreement)
    fmt = f"tflite_{SERVING_VARIANT}" if path else "keras"
    print(f"train: serving with {fmt} (the TFLite copy agrees with Keras on "
          f"{agreement:.1%} of {len(pixels)} validation images)")
    return ({"tflite_model": str(path)} if path else {}), fmt


def log_to_mlflow(client, run_id: str, params: Params, classes, timings) -> dict:
    import mlflow
    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    import stages
    from stages import tracking

    for path in (paths.TRAIN_CURVES, paths.TRAIN_HISTORY, paths.CLASSES_JSON,
                 paths.AUGMENT_PREVIEW, paths.TRAIN_METRICS):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    for key, value in timings.items():
        client.log_metric(run_id, key, value)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec("string", "top_k"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("top_k", "long", 5)]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        extra, serving_format = serving_artifacts(client, run_id, params, Path(tmp))
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"image_size": params.model.image_size,
                                      "resize": params.model.resize,
                                      "max_pixels": params.prepare.max_pixels,
                                      "format": serving_format}))
        requirements = [f"{name}=={version(name)}" for name in
                        ("tensorflow-cpu", "keras", "pillow", "numpy", "pandas", "mlflow")]
        tracking.use_fluent()
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(stages.__file__).parent / "pyfunc_model.py"),
                artifacts={"keras_model": str(paths.MODEL_FILE),
                           "classes": str(paths.CLASSES_JSON), "config": str(config), **extra},
                code_paths=[str(Path(stages.__file__).parent)],
                signature=signature,
                input_example=pd.DataFrame({"image": [input_example(params)]}),
                registered_model_name=params.mlflow.model_name,
                pip_requirements=requirements,
            )
    return {"model_uri": info.model_uri, "version": info.registered_model_version}


def relog() -> dict:
    """`imgclf relog`: send the MLflow run what a training kept on disk while its tracking
    server was lost (models/mlflow_pending.json), with nothing lost and nothing sent twice."""
    from stages import tracking
    from stages.inputs import read_classes

    params = load_params()
    if not paths.MLFLOW_PENDING.is_file():
        raise UserError(f"nothing to relog: {paths.MLFLOW_PENDING} does not exist (every "
                        "finished training here has reached MLflow)")
    pending = read_pending(params)
    if pending is None:
        raise UserError(f"{paths.MLFLOW_PENDING} belongs to another training than params.yaml, "
                        f"data/prepared and {paths.MODEL_FILE} now hold; restore them (git "
                        "checkout, dvc checkout) and run `imgclf relog` again")
    tracking.check_reachable()
    report = publish(tracking.make_client(), params, read_classes(), pending)
    print(f"relog: MLflow run {report['run_id']} complete; registered "
          f"{report['registered_model']} version {report['model_version']}. If the train "
          "stage ended with this error under DVC, `dvc commit train` records it as done.")
    return report


@exits_cleanly
def main() -> None:
    params = load_params()
    from stages.distribute import make_strategy
    from stages.model import resolve_weights

    # First TensorFlow work of the process: a multi-worker strategy must come before any.
    strategy, role = make_strategy(params.train.strategy)
    weights = resolve_weights(params.model.weights)  # offline imagenet fails here, in seconds
    from mlflow.exceptions import MlflowException

    from stages import tracking

    client = None
    if role.is_chief:
        tracking.check_reachable()
        client = tracking.make_client()
        try:
            tracking.ensure_experiment(client, params.mlflow.experiment)
        except MlflowException as err:
            raise UserError(tracking.unusable_message(err)) from None
    pending = read_pending(params) if role.is_chief else None
    if pending is not None:
        # This exact training already finished; only MLflow missed it (server lost).
        print(f"train: {paths.MODEL_FILE} is already trained for these params and data; "
              "sending MLflow what it missed instead of retraining")
        from stages.inputs import read_classes

        report = publish(client, params, read_classes(), pending)
    else:
        report = train_and_track(params, client, weights, strategy, role)
    if not role.is_chief:
        return
    print(f"train: best epoch {report['best_epoch']} ({report['monitor']} "
          f"{report['best_value']:.4f}); model {paths.MODEL_FILE}; MLflow run "
          f"{report['run_id']}; registered {params.mlflow.model_name} "
          f"version {report['model_version']}")


if __name__ == "__main__":
    main()
