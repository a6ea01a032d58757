"""One training session from the prepared data to the model file, as the Keras
transfer-learning guide runs it: build, fit the head on the frozen base, unfreeze the top and
recompile, fit again, calibrate, save (with the model's own features of its training and
validation images, for the selective stage).

What is not training is passed in: the `RunLog` that records the run (the stage gives it
MLflow's, `imgclf.tracking.runs.TrainingRun`; a worker and a test give `NoRunLog`), the
distribution strategy and this process's role in it. Resume state, written after every
epoch, lets a killed run continue where it stopped.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from imgclf import io, paths
from imgclf.errors import UserError
from imgclf.params import Params


class RunLog:
    """What records a training run, and the default that records nothing. `start` names the
    run (continuing `saved_run_id` when the resume state has one) and says whether it is the
    one resumed; `epoch` sees each finished epoch; `finished` gets everything the run has to
    receive once the model is saved, before the checkpoints are dropped."""

    run_id: str | None = None
    label = "the interrupted training"  # what a resume says it continues

    def start(self, saved_run_id: str | None) -> bool:
        return True  # nothing recorded, nothing to reconcile: a saved state always resumes

    def send_missing(self, history: list[dict]) -> None:
        """On resume: the epochs the resume state holds that the record lacks."""

    def epoch(self, row: dict) -> None:
        """One finished epoch's row."""

    def killed(self) -> None:
        """Training died."""

    def finished(self, history: list[dict], timings: dict, outputs: dict) -> None:
        """The model is saved."""


NoRunLog = RunLog


def keras_setup(params: Params) -> None:
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

    from imgclf.data.manifests import read_manifest
    from imgclf.data.pipeline import image_dataset
    from imgclf.model.augmentation import augmenter
    from imgclf.training.phases import Data, seed_states

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


def shipped_copy(classifier, params: Params, num_classes: int, distributed: bool):
    """The trained model as it ships, holding the same weights: outside any distribution
    strategy (calibration and saving then need no other worker), without the optimizer's
    state (the `.keras` file holds what serves, no more), and under the float32 policy
    (mixed precision keeps its variables in float32 already: it is a training speed-up; the
    model that ships computes in float32, so evaluation, export and serving give the same
    answers on every machine, bf16 hardware or not). A model trained in float32 outside any
    strategy is already all that: a new model over the same layers drops the optimizer,
    where building the network again would cost as much as building it the first time."""
    import keras

    from imgclf.model.network import Classifier, build_classifier

    if not distributed and keras.mixed_precision.global_policy().name == "float32":
        model = classifier.model
        return Classifier(model=keras.Model(model.inputs, model.outputs, name=model.name),
                          base=classifier.base, head_layers=classifier.head_layers)
    keras.mixed_precision.set_global_policy("float32")
    shipped = build_classifier(params.model, num_classes, None, seed=params.train.seed)
    shipped.model.set_weights(classifier.model.get_weights())
    return shipped


def worker_dir(role, fp: str) -> Path:
    """A non-chief worker's own checkpoint folder: outside the project (only the chief writes
    there), and stable across restarts so that a restarted worker resumes with the chief."""
    return Path(tempfile.gettempdir()) / f"imgclf-worker{role.index}-{fp}"


def validation_probs(classifier, data, params: Params):
    """The model's probabilities on the validation split: from the stored activations when
    there are some (the top block and the head run, not the base), else from the images."""
    if data.features is None:
        return classifier.model.predict(data.make_images(data.val_files, None, False, None),
                                        verbose=0)
    import numpy as np

    from imgclf.features import row_dataset
    from imgclf.model.network import split_base
    from imgclf.training.phases import on_stored_arrays

    # `classifier` is the shipped copy: its own base's top, not the one the arrays were read for
    top = split_base(classifier.base, params.train.unfreeze)[1] if data.features.has_cut else None
    stored = on_stored_arrays(classifier, data.features, "done", top)
    onehot = np.eye(data.num_classes, dtype=np.float32)[data.val_labels]
    return stored.model.predict(row_dataset(data.features.reader("val", stored.kind), onehot,
                                            params.train.batch_size), verbose=0)


def calibrate(classifier, data, params: Params) -> dict:
    """Fit the temperature on the validation split (the best weights are loaded by now) and
    bake it into the classifier; returns T and the validation log loss before and after."""
    from imgclf.metrics import nll
    from imgclf.model.calibration import bake_temperature, fit_temperature

    probs = validation_probs(classifier, data, params)
    temperature = fit_temperature(probs, data.val_labels)
    bake_temperature(classifier.model, temperature)
    result = {"temperature": round(temperature, 6),
              "val_log_loss_before": round(nll(probs, data.val_labels), 6),
              "val_log_loss_after": round(nll(probs, data.val_labels, temperature), 6)}
    print(f"train: temperature {temperature:.3f} fitted on {len(data.val_labels)} validation "
          f"images: their log loss {result['val_log_loss_before']:.4f} -> "
          f"{result['val_log_loss_after']:.4f}, every top-1 answer unchanged")
    return result


def write_reports(params: Params, state, timings: dict) -> dict:
    """The stage's history and best-epoch metrics; returns what train.json adds. (The curves
    are drawn by evaluate: a change to how they look must not retrain.)"""
    import pandas as pd

    from imgclf.metrics import epoch_metrics

    io.write_csv(paths.TRAIN_HISTORY, pd.DataFrame(state.history))
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    metrics = {"best_epoch": state.best_epoch, "epochs_run": state.epochs_done,
               **({k: round(v, 6) for k, v in epoch_metrics(best).items()} if best else {})}
    metrics.pop("learning_rate", None)
    io.write_json(paths.TRAIN_METRICS, metrics)
    return {"best_epoch": state.best_epoch, "monitor": params.train.monitor,
            "best_value": state.best, "epochs_run": state.epochs_done,
            "head_epochs_run": state.head_epochs_run,
            "epoch_seconds": [r["epoch_seconds"] for r in state.history], **timings}


def train(params: Params, weights: str | None, run_log: RunLog | None = None,
          strategy=None, role=None) -> dict:
    """Build, train both phases (resuming if possible), calibrate and save; returns what
    reports/train.json holds besides the run's id."""
    import tensorflow as tf

    from imgclf.training.distribute import Role

    strategy = strategy or tf.distribute.get_strategy()
    role = role or Role("none")
    with contextlib.ExitStack() as strategy_scope:
        strategy_scope.enter_context(strategy.scope())
        return _train(params, run_log or NoRunLog(), weights, role, strategy_scope)


def resume_saver(classifier, resume_dir: Path, fp: str, run_id: str | None):
    """The Tracker hook that writes an epoch's resume state (what that phase changes, the
    optimizer, the tracker state), then drops best-weights files the state no longer names."""
    from imgclf.training import resume
    from imgclf.training.phases import checkpoint_of, checkpoint_scope, optimizer_state

    def save_resume_state(row, tracker):
        scope = checkpoint_scope(row["phase"])
        resume.save(resume_dir, checkpoint_of(classifier, scope),
                    optimizer_state(tracker.optimizer), tracker.state, fp, run_id,
                    same_weights_as=tracker.best_path if row["best"] else None, scope=scope)
        tracker.prune_best()
        io.fault_point("saved", row["epoch"])  # the kill tests

    return save_resume_state


def _load_saved(classifier, resume_dir: Path, fp: str, enabled: bool):
    """The resume state of this configuration with its weights loaded, or None."""
    from imgclf.training import resume

    saved = resume.load(resume_dir, fp) if enabled else None
    if saved is None:
        return None
    from imgclf.training.phases import checkpoint_of

    try:
        checkpoint_of(classifier, saved.scope).load_weights(saved.weights)
    except (OSError, ValueError, KeyError) as err:
        # A checkpoint damaged on disk (the state itself is written atomically): the epochs
        # are lost, the run is not; start clean rather than train on garbage.
        print(f"warning: resume checkpoint {saved.weights} is unreadable ({err}); "
              "training starts from scratch", file=sys.stderr)
        return None
    return saved


def _fit(classifier, data, params: Params, tracker, saved, fp: str,
         run_id: str | None) -> None:
    """Both phases from wherever `tracker.state` stands."""
    from imgclf.training import resume
    from imgclf.training.phases import (
        checkpoint_of,
        finish,
        run_finetune_phase,
        run_head_phase,
        start_finetune,
    )

    state = tracker.state
    # The phase the saved optimizer belongs to, read now: `state` moves on to "finetune".
    saved_phase = state.phase if saved is not None else None
    if state.phase == "head":
        arrays = saved.optimizer_arrays if saved_phase == "head" else None
        run_head_phase(classifier, tracker=tracker, data=data, train=params.train,
                       optimizer_arrays=arrays)
        start_finetune(classifier, tracker, params.train.unfreeze)  # from the best weights
        resume.save(tracker.checkpoints / paths.RESUME_DIR.name,
                    checkpoint_of(classifier, "top"), None, state, fp, run_id,
                    same_weights_as=tracker.best_path, scope="top")
        tracker.prune_best()
    if state.phase == "finetune":
        arrays = saved.optimizer_arrays if saved_phase == "finetune" else None
        run_finetune_phase(classifier, data, params.train, tracker, optimizer_arrays=arrays)
    finish(classifier, tracker)


def _train(params: Params, run_log: RunLog, weights: str | None, role,
           strategy_scope) -> dict:
    """The Keras transfer-learning recipe, resumable: build, fit the head on the frozen base,
    unfreeze the top and recompile, fit again (`_fit`), then calibrate and save (`_ship`)."""
    from imgclf.data.manifests import read_classes
    from imgclf.model.network import build_classifier, weights_digest

    keras_setup(params)
    classes = read_classes()
    data = make_data(params, classes)
    classifier = build_classifier(params.model, len(classes), weights, seed=params.train.seed)
    if params.features.cache:
        from imgclf import features

        data.features = features.read(paths.FEATURES_DIR, params, data, classifier)
    tracker, saved, fp = _tracker(params, classifier, run_log, role)
    try:
        _fit(classifier, data, params, tracker, saved, fp, run_log.run_id)
    except BaseException:
        run_log.killed()
        raise
    # Saving and calibration run outside the strategy: under a multi-worker one, a
    # variable created now would wait forever for workers that have already finished.
    strategy_scope.close()
    digest = weights_digest(classifier.model)
    print(f"train: worker {role.index} of {role.num_workers} finished; weights digest {digest}")
    if role.is_chief:
        outputs, timings = _ship(classifier, data, params, tracker.state, role, digest)
        # Before the checkpoints go: a kill from here on costs the record a `relog`, never
        # the training.
        run_log.finished(tracker.state.history, timings, outputs)
    else:
        outputs = {"weights_digest": digest, "worker": role.index}
    shutil.rmtree(tracker.checkpoints, ignore_errors=True)
    return outputs


def _tracker(params: Params, classifier, run_log: RunLog, role):
    """(the epoch tracker, the resume state it continues or None, the configuration's
    fingerprint). The tracker's hooks write the resume state after every epoch, then hand
    the epoch to `run_log` (the chief's)."""
    from imgclf.data.manifests import data_version
    from imgclf.training import resume
    from imgclf.training.phases import Tracker, TrackerState

    fp = resume.fingerprint(params.flat(), data_version())
    checkpoints = paths.CHECKPOINTS_DIR if role.is_chief else worker_dir(role, fp)
    resume_dir = checkpoints / paths.RESUME_DIR.name
    saved = _load_saved(classifier, resume_dir, fp, params.train.resume)
    if not run_log.start(saved.run_id if saved else None):
        saved = None  # the run it belongs to is not the one recording now
    state = saved.state if saved else TrackerState()
    if saved:
        print(f"train: resuming {run_log.label} after epoch {state.epochs_done} "
              f"({state.phase} phase)")
        run_log.send_missing(state.history)
    checkpoints.mkdir(parents=True, exist_ok=True)

    def log(row, tracker):
        run_log.epoch(row)
        io.fault_point("logged", row["epoch"])

    # Saved first, then logged: a kill between the two leaves an epoch that the resumed run
    # sends (`send_missing`); logged first, the resumed run would train and log it again.
    tracker = Tracker(classifier, state, params.train.monitor,
                      params.train.early_stopping_patience, checkpoints,
                      hooks=[resume_saver(classifier, resume_dir, fp, run_log.run_id),
                             *([log] if role.is_chief else [])])
    return tracker, saved, fp


def _keep_embeddings(classifier, data, params: Params) -> None:
    """The shipped model's features of its training and validation images (`embeddings`)."""
    from imgclf.model.network import split_base
    from imgclf.training import embeddings

    top = None
    if data.features is not None and data.features.has_cut:
        top = split_base(classifier.base, params.train.unfreeze)[1]
    embeddings.write(classifier, data, top, max(params.train.batch_size, 64), paths.EMBEDDINGS)


def _ship(classifier, data, params: Params, state, role,
          trained_digest: str) -> tuple[dict, dict]:
    """The trained model as it ships, calibrated and saved; (what reports/train.json holds
    without the run id, the run's timings beyond its epochs)."""
    from imgclf.model.network import weights_digest

    classifier = shipped_copy(classifier, params, data.num_classes,
                              distributed=role.strategy_name != "none")
    calibration = calibrate(classifier, data, params) if params.train.calibrate else {}
    _keep_embeddings(classifier, data, params)
    with io.replacing(paths.MODEL_FILE) as tmp:
        classifier.model.save(tmp)
    # What this run's training cost beyond its epochs: the features stage's forward pass,
    # which experiments on training params share.
    timings = {"features_stage_seconds": data.features.meta["seconds"]} if data.features else {}
    outputs = write_reports(params, state, timings)
    # weights_digest: the model.keras file's; trained_weights_digest: before calibration,
    # what every worker of a distributed run prints.
    outputs.update(strategy=role.strategy_name, workers=role.num_workers,
                   weights_digest=weights_digest(classifier.model),
                   trained_weights_digest=trained_digest,
                   temperature=calibration.get("temperature", 1.0), calibration=calibration)
    return outputs, timings
