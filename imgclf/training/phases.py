"""Two-phase transfer learning, following the Keras guide.

Phase 1 ("head"): the base frozen, only the head trains, at `train.head_lr`. With
`features.cache` it trains on the pooled features the `features` stage stored: the same
function of the same inputs, many times faster, because a frozen base gives the same output
every epoch.

Phase 2 ("finetune"): the top of the base unfrozen (BatchNorm stays frozen and the base in
inference mode), recompiled at the small `train.finetune_lr`. With `features.cache` only the
top runs, on the activations stored at the cut: the frozen layers below it give the same
output every epoch too.

One `Tracker` follows both phases on one epoch axis: it keeps the history, saves the best
weights by the validation metric across both phases (a fine-tune that makes things worse
never replaces a better head-only model), stops a phase early, and hands each finished epoch
to the stage's hooks (MLflow logging, resume state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from imgclf import io
from imgclf.features import Features, row_dataset
from imgclf.model.network import Classifier, freeze_base, unfreeze_top
from imgclf.params import TrainParams

METRIC_NAMES = ("loss", "accuracy", "top5_accuracy")


# ---------------------------------------------------------------- optimisation set-up


def learning_rate(train: TrainParams, base_lr: float, steps_per_epoch: int, epochs: int):
    """A float or a schedule stepping once per batch (Keras optimizers count batches)."""
    total = max(1, steps_per_epoch * epochs)
    if train.lr_schedule == "cosine":
        warmup = min(total - 1, steps_per_epoch * train.warmup_epochs)
        if warmup > 0:
            return keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=base_lr * 0.01, decay_steps=total - warmup,
                warmup_target=base_lr, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(base_lr, decay_steps=total)
    if train.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            base_lr, decay_steps=steps_per_epoch, decay_rate=train.decay_rate)
    return base_lr  # constant, or plateau (a callback lowers it)


def make_optimizer(train: TrainParams, lr) -> keras.optimizers.Optimizer:
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=train.momentum, nesterov=True)
    return keras.optimizers.Adam(learning_rate=lr)


# Steps run per call into the compiled graph when training on stored arrays: their steps are
# small (the top block, or the head alone), so Python's round trip per step is a large part
# of each. Same batches, same updates.
STORED_STEPS_PER_EXECUTION = 8


def compile_model(model: keras.Model, optimizer, train: TrainParams,
                  steps_per_execution: int = 1) -> None:
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy")],
        steps_per_execution=steps_per_execution,
    )


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    if mode != "balanced":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = dict.fromkeys(range(num_classes), 1.0)
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def optimizer_state(optimizer: keras.optimizers.Optimizer) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in optimizer.variables]


def restore_optimizer(optimizer, variables: list, arrays: list[np.ndarray]) -> None:
    """Rebuild the optimizer's slots for `variables`, then load the saved values."""
    optimizer.build(variables)
    if len(optimizer.variables) != len(arrays):
        raise ValueError("saved optimizer state does not match the model")
    for var, value in zip(optimizer.variables, arrays, strict=True):
        var.assign(value)


# ---------------------------------------------------------------- random streams per epoch

EPOCH_STRIDE = 2**20  # draws a generator may make in one epoch (one per batch): ample


def seed_states(*owners) -> list:
    """The state variables of the keras SeedGenerators (or their states) given, or inside the
    layers given; each once."""
    states, seen = [], set()
    for owner in owners:
        if isinstance(owner, keras.Variable):
            found = [owner]
        elif isinstance(owner, keras.random.SeedGenerator):
            found = [owner.state]
        else:
            found = [v for v in owner.variables if v.name == "seed_generator_state"]
        for state in found:
            if id(state) not in seen:
                seen.add(id(state))
                states.append(state)
    return states


class EpochSeeds(keras.callbacks.Callback):
    """Every random stream of training (shuffle order, augmentation, dropout, cached view)
    restarts at each epoch from (its seed, the epoch).

    Keras SeedGenerators count their draws in the process, so a training resumed at epoch k
    would replay epoch 0's draws. Keyed on the epoch, epoch k draws the same numbers whether
    the process ran epochs 0..k-1 or resumed from their checkpoint: with
    `train.deterministic`, a resumed training ends with the very weights of an uninterrupted
    one.
    """

    def __init__(self, states: list):
        super().__init__()
        self.states = states

    def on_epoch_begin(self, epoch, logs=None):
        for state in self.states:
            seed = keras.ops.convert_to_numpy(state)[0]
            state.assign(np.array([seed, epoch * EPOCH_STRIDE], dtype="int64"))


# ---------------------------------------------------------------- the epoch tracker


@dataclass
class TrackerState:
    """Everything about training so far that a resumed run needs (JSON-serialisable)."""

    phase: str = "head"                 # head | finetune | done
    epochs_done: int = 0                # global epochs completed, both phases
    head_epochs_run: int = 0            # epochs phase 1 actually ran (early stopping may cut)
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0                       # epochs without improvement in the current phase
    history: list[dict] = field(default_factory=list)
    best_scope: str = "full"            # what the best epoch's weights file holds: head |
    #                                     top (phase 2's trainable weights) | full
    # ReduceLROnPlateau's counters in the current phase (train.lr_schedule: plateau), so a
    # resumed run cuts the learning rate when the unbroken one would have.
    plateau: dict | None = None


def checkpoint_scope(phase: str) -> str:
    """What a phase's epochs change: the head alone in phase 1 (the base is frozen); in
    phase 2 the head and the unfrozen top of the base (BatchNorm stays frozen). Checkpoints
    hold that and no more."""
    return "head" if phase == "head" else "top"


class ChangingWeights:
    """Checkpoint of phase 2: the model's trainable weights (the head and the unfrozen top:
    5.2M of InceptionResNetV2's 54M weights with `unfreeze: block8_9_ac`), keyed by their
    place in `model.weights`, so a rebuilt model loads them whatever names Keras gave its
    layers in that process. Writing all 54M weights every epoch would cost more than a
    fine-tune epoch on stored activations; everything else is what the model was built
    with."""

    def __init__(self, model: keras.Model):
        self.model = model

    def save_weights(self, path: Path) -> None:
        import h5py

        trainable = {id(v) for v in self.model.trainable_weights}
        with h5py.File(path, "w") as out:
            for i, variable in enumerate(self.model.weights):
                if id(variable) in trainable:
                    out.create_dataset(f"{i:05d}", data=keras.ops.convert_to_numpy(variable))

    def load_weights(self, path: Path) -> None:
        import h5py

        weights = self.model.weights
        with h5py.File(path, "r") as stored:
            for key in stored:
                variable, value = weights[int(key)], stored[key][()]
                if tuple(variable.shape) != value.shape:
                    raise ValueError(f"{path}: weight {key} has shape {value.shape}, the "
                                     f"model's {tuple(variable.shape)}")
                variable.assign(value)


def checkpoint_of(classifier: Classifier, scope: str) -> keras.Model | ChangingWeights:
    """What saves and loads a checkpoint of `scope` (head | top | full)."""
    if scope == "head":
        return classifier.head()
    return ChangingWeights(classifier.model) if scope == "top" else classifier.model


def load_best(classifier: Classifier, tracker: Tracker) -> None:
    path = tracker.best_path
    if path is not None and path.is_file():
        checkpoint_of(classifier, tracker.state.best_scope).load_weights(path)


class Tracker(keras.callbacks.Callback):
    """Per-epoch bookkeeping shared by both phases (see the module docstring)."""

    def __init__(self, classifier: Classifier, state: TrackerState, monitor: str,
                 patience: int, checkpoints: Path,
                 hooks: list[Callable[[dict, Tracker], None]]):
        super().__init__()
        self.classifier = classifier
        self.state = state
        self.monitor = monitor
        self.patience = patience
        self.checkpoints = checkpoints
        self.hooks = hooks
        self.optimizer = None
        self._start = 0.0
        self.last_row: dict = {}

    def best_file(self, epoch: int, scope: str) -> Path:
        return self.checkpoints / f"best-{scope}-{epoch:04d}.weights.h5"

    @property
    def best_path(self) -> Path | None:
        """The weights of the best epoch the state records, or None before one."""
        if self.state.best_epoch is None:
            return None
        return self.best_file(self.state.best_epoch, self.state.best_scope)

    def write_best(self, epoch: int, scope: str) -> None:
        """The best epoch's weights (what `scope` holds), atomically, under the epoch's name:
        a kill before the resume state records the epoch leaves the file the state names
        untouched (the resumed run loads that one)."""
        with io.replacing(self.best_file(epoch, scope)) as tmp:
            checkpoint_of(self.classifier, scope).save_weights(tmp)
        self.state.best_scope = scope

    def prune_best(self) -> None:
        """Once the state is saved: drop best-weights files it no longer names."""
        for path in self.checkpoints.glob("best-*.weights.h5"):
            if path != self.best_path:
                path.unlink(missing_ok=True)

    def improved(self, value: float) -> bool:
        if self.state.best is None:
            return True
        return value < self.state.best if self.monitor == "val_loss" else value > self.state.best

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row = {"epoch": epoch, "phase": self.state.phase}
        for name in METRIC_NAMES:
            row[name] = float(logs.get(name, math.nan))
            row[f"val_{name}"] = float(logs.get(f"val_{name}", math.nan))
        row["learning_rate"] = current_lr(self.model.optimizer)
        row["epoch_seconds"] = round(time.perf_counter() - self._start, 3)
        value = row[self.monitor]
        if not math.isnan(value) and self.improved(value):
            self.state.best, self.state.best_epoch, self.state.wait = value, epoch, 0
            self.write_best(epoch, checkpoint_scope(self.state.phase))
            row["best"] = True
        else:
            self.state.wait += 1
            row["best"] = False
        self.state.history.append(row)
        self.state.epochs_done = epoch + 1
        if self.state.phase == "head":
            self.state.head_epochs_run += 1
        if self.patience and self.state.wait >= self.patience:
            self.model.stop_training = True
        self.last_row = row

    def callbacks(self, *others: keras.callbacks.Callback) -> list[keras.callbacks.Callback]:
        """The tracker, the other callbacks, then `_AfterEpoch`: the stage's hooks (resume
        state, MLflow) see the epoch once every callback is done with it, a learning-rate
        cut by ReduceLROnPlateau included."""
        return [self, *others, _AfterEpoch(self, others)]


_PLATEAU_FIELDS = ("wait", "best", "cooldown_counter")


class _AfterEpoch(keras.callbacks.Callback):
    def __init__(self, tracker: Tracker, others):
        super().__init__()
        self.tracker = tracker
        self.plateau = next((c for c in others
                             if isinstance(c, keras.callbacks.ReduceLROnPlateau)), None)

    def on_train_begin(self, logs=None):
        # After ReduceLROnPlateau's own on_train_begin, which resets its counters.
        saved = self.tracker.state.plateau
        if self.plateau is not None and saved and saved.get("phase") == self.tracker.state.phase:
            for name in _PLATEAU_FIELDS:
                setattr(self.plateau, name, saved[name])

    def on_epoch_end(self, epoch, logs=None):
        state = self.tracker.state
        if self.plateau is not None:
            state.plateau = {"phase": state.phase, **{
                name: float(getattr(self.plateau, name)) for name in _PLATEAU_FIELDS}}
        for hook in self.tracker.hooks:
            hook(self.tracker.last_row, self.tracker)


# ---------------------------------------------------------------- the two phases


@dataclass
class Data:
    """What training reads: files and integer labels per split, and the pipelines' maker."""

    train_files: list[str]
    train_labels: np.ndarray
    val_files: list[str]
    val_labels: np.ndarray
    num_classes: int
    # (files, labels, shuffle, augment_seed | None, batch_size=None) -> batches
    make_images: Callable[..., tf.data.Dataset]
    # () -> state variables of the pipelines' SeedGenerators, for EpochSeeds
    random_states: Callable[[], list] = list
    # The features stage's arrays (features.cache), or None: every step runs the whole base.
    features: Features | None = None


def _plateau(train: TrainParams) -> list[keras.callbacks.Callback]:
    if train.lr_schedule != "plateau":
        return []
    return [keras.callbacks.ReduceLROnPlateau(
        monitor=train.monitor, factor=train.plateau_factor, patience=train.plateau_patience,
        mode="min" if train.monitor == "val_loss" else "max", min_lr=1e-8, verbose=1)]


def _steps(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def run_head_phase(classifier: Classifier, data: Data, train: TrainParams, tracker: Tracker,
                   optimizer_arrays: list[np.ndarray] | None = None) -> None:
    state = tracker.state
    if state.epochs_done >= train.head_epochs or (train.early_stopping_patience
                                                  and state.wait >= train.early_stopping_patience):
        return
    freeze_base(classifier.base)
    lr = learning_rate(train, train.head_lr, _steps(len(data.train_files), train.batch_size),
                       train.head_epochs)
    optimizer = make_optimizer(train, lr)
    _fit_phase(classifier, data, train, tracker, optimizer, optimizer_arrays,
               on_stored_arrays(classifier, data.features, "head"), train.head_epochs)


def _fit_phase(classifier: Classifier, data: Data, train: TrainParams, tracker: Tracker,
               optimizer, optimizer_arrays: list[np.ndarray] | None,
               stored: OnStoredArrays | None, end: int) -> None:
    """Train up to epoch `end`: with `stored` on the features stage's arrays, else the whole
    model on images."""
    onehot = np.eye(data.num_classes, dtype=np.float32)
    if stored is not None:
        model, kind = stored.model, stored.kind
        order = keras.random.SeedGenerator(train.seed)
        fit_data = row_dataset(data.features.reader("train", kind), onehot[data.train_labels],
                               train.batch_size, order)
        val_data = row_dataset(data.features.reader("val", kind), onehot[data.val_labels],
                               train.batch_size)
        streams = seed_states(order, model)
    else:
        model = classifier.model
        fit_data = data.make_images(data.train_files, data.train_labels, True, train.seed)
        val_data = data.make_images(data.val_files, data.val_labels, False, None)
        streams = seed_states(model, *data.random_states())
    # (re)compiled: `trainable` changed. Several steps a call only without a distribution
    # strategy: under a multi-worker one, Keras 3.15's step loop fails to build (TF 2.21).
    compile_model(model, optimizer, train, STORED_STEPS_PER_EXECUTION
                  if stored is not None and not tf.distribute.has_strategy() else 1)
    if optimizer_arrays:
        restore_optimizer(optimizer, model.trainable_variables, optimizer_arrays)
    tracker.optimizer = optimizer
    # shuffle=False: the datasets shuffle themselves, by epoch (Keras would only warn).
    model.fit(fit_data, validation_data=val_data, epochs=end,
              initial_epoch=tracker.state.epochs_done, shuffle=False,
              class_weight=class_weights(data.train_labels, data.num_classes,
                                         train.class_weights),
              callbacks=[EpochSeeds(streams), *tracker.callbacks(*_plateau(train))], verbose=2)


def start_finetune(classifier: Classifier, tracker: Tracker, unfreeze: int | str) -> None:
    """Between the phases: continue from the best weights so far, not the last epoch's, with
    the top of the base unfrozen."""
    state = tracker.state
    load_best(classifier, tracker)
    unfreeze_top(classifier.base, unfreeze)
    if state.best_epoch is not None and state.best_scope == "head":
        # Phase 2 changes the top of the base: from here the best must hold it too, or a
        # fine-tune that never improves would end with its top and phase 1's head. Once.
        tracker.write_best(state.best_epoch, "top")
    state.phase = "finetune"
    state.wait = 0
    state.plateau = None


def run_finetune_phase(classifier: Classifier, data: Data, train: TrainParams,
                       tracker: Tracker, optimizer_arrays: list[np.ndarray] | None = None,
                       ) -> None:
    state = tracker.state
    end = state.head_epochs_run + train.finetune_epochs
    if train.finetune_epochs == 0 or state.epochs_done >= end:
        return
    unfreeze_top(classifier.base, train.unfreeze)
    lr = learning_rate(train, train.finetune_lr,
                       _steps(len(data.train_files), train.batch_size), train.finetune_epochs)
    optimizer = make_optimizer(train, lr)
    _fit_phase(classifier, data, train, tracker, optimizer, optimizer_arrays,
               on_stored_arrays(classifier, data.features, "finetune"), end)


@dataclass(frozen=True)
class OnStoredArrays:
    """A model that reads one kind of the features stage's arrays instead of pixels."""

    model: keras.Model
    kind: str  # pooled (the base's pooled features) | cut (the activations at the cut)


def on_stored_arrays(classifier: Classifier, features: Features | None, phase: str,
                     top: keras.Model | None = None) -> OnStoredArrays | None:
    """What runs on the stored arrays instead of the whole model on images (None). Phase 1
    ("head"): the head on the pooled features. Phase 2 ("finetune"): the base's top and the
    head on the activations at the cut (None when nothing is cut: phase 2 then trains on
    images). The trained model ("done", for calibration): the same, or the head on the pooled
    features when nothing was unfrozen. `top`: the base above the cut of `classifier` when
    it is not the one the arrays were read for."""
    if features is None:
        return None
    if phase == "head":
        return OnStoredArrays(classifier.feature_head(), "pooled")
    if features.has_cut:
        return OnStoredArrays(on_cut_activations(classifier, top or features.top), "cut")
    return OnStoredArrays(classifier.feature_head(), "pooled") if phase == "done" else None


def on_cut_activations(classifier: Classifier, top: keras.Model) -> keras.Model:
    """Activations at the cut -> class probabilities: the base's top and the head, sharing
    the classifier's layers (what it learns, the full model holds). Inference mode for the
    top, as the full model calls its base."""
    cut = keras.Input(top.input_shape[1:], name="cut_activations")
    x = classifier.pool(top(cut, training=False))
    for layer in classifier.head_layers:
        x = layer(x)
    return keras.Model(cut, x, name="finetune_on_cut")


def finish(classifier: Classifier, tracker: Tracker) -> None:
    """Leave the full model holding the best weights seen in either phase."""
    load_best(classifier, tracker)
    tracker.state.phase = "done"
