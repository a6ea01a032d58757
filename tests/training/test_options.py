"""The `train` options users set, each doing what params.yaml says it does.

Phase 1 runs for real (the head trains on stored features, logged per epoch through the
Tracker, exactly as the stage runs it); the base is a small stand-in with
InceptionResNetV2's output width, so each run takes a second instead of a full network build.
The BatchNorm test uses the real base: it is about that network's statistics.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import make_class_folders, run_module, set_params

from imgclf import features, paths
from imgclf.data.manifests import read_classes
from imgclf.model import network
from imgclf.params import Params, TrainParams, load_params
from imgclf.training.phases import (
    Tracker,
    TrackerState,
    class_weights,
    compile_model,
    optimizer_state,
    run_finetune_phase,
    run_head_phase,
    start_finetune,
)
from imgclf.training.session import keras_setup, make_data


def stand_in_base(image_size: int, weights):
    """A two-conv base with InceptionResNetV2's name and output channels."""
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.Conv2D(network.FEATURE_DIM, 1, name="conv_7b_ac")(x)
    return keras.Model(inputs, x, name=network.BASE_NAME)


@pytest.fixture
def small_base(monkeypatch):
    monkeypatch.setattr(network, "build_base", stand_in_base)


def with_train(params: Params, **train) -> Params:
    return params.model_copy(update={"train": TrainParams(**{**params.train.model_dump(),
                                                            **train})})


def head_history(project, params: Params, state: TrackerState | None = None,
                 optimizer_arrays=None, hooks=()) -> tuple[list[dict], object]:
    """Phase 1 as the stage runs it; (the history rows the stage logs, the optimizer)."""
    keras_setup(params)
    classes = read_classes()
    data = make_data(params, classes)
    clf = network.build_classifier(params.model, len(classes), None, seed=params.train.seed)
    # The features stage's arrays, from this base; pooled only (unfreeze 0): the stand-in
    # has no block to cut at, and phase 1 reads only the pooled features.
    head_only = with_train(params, unfreeze=0)
    features.write(project / "features", clf, head_only, data.train_files, data.val_files)
    data.features = features.read(project / "features", head_only, data, clf)
    tracker = Tracker(clf, state or TrackerState(), params.train.monitor,
                      params.train.early_stopping_patience, project,
                      list(hooks))
    run_head_phase(clf, data, params.train, tracker, optimizer_arrays=optimizer_arrays)
    return tracker.state.history, tracker.optimizer


def lrs(history) -> list[float]:
    return [row["learning_rate"] for row in history]


def test_learning_rate_schedules_per_epoch_as_logged(prepared_project, small_base):
    base = with_train(load_params(), head_epochs=4, early_stopping_patience=0, head_lr=0.01)
    steps = math.ceil(_train_size() / base.train.batch_size)

    constant, _ = head_history(prepared_project, base)
    assert lrs(constant) == pytest.approx([0.01] * 4)

    # exponential: decay_rate per epoch (one decay step = one epoch's batches).
    exponential, _ = head_history(prepared_project, with_train(base, lr_schedule="exponential",
                                                           decay_rate=0.5))
    assert lrs(exponential) == pytest.approx([0.01 * 0.5 ** (e + 1) for e in range(4)],
                                             rel=1e-5)

    # cosine: from head_lr down to 0 at the phase's last step.
    cosine, _ = head_history(prepared_project, with_train(base, lr_schedule="cosine"))
    total = 4 * steps
    assert lrs(cosine) == pytest.approx(
        [0.01 * 0.5 * (1 + math.cos(math.pi * (e + 1) * steps / total)) for e in range(4)],
        rel=1e-4, abs=1e-9)
    assert lrs(cosine)[-1] == pytest.approx(0.0, abs=1e-9)

    # cosine with warm-up: rises for warmup_epochs to head_lr, then decays.
    warm, _ = head_history(prepared_project, with_train(base, lr_schedule="cosine",
                                                    warmup_epochs=2))
    rates = lrs(warm)
    assert rates[0] < rates[1] == pytest.approx(0.01, rel=1e-4)
    assert rates[1] > rates[2] > rates[3]


def test_plateau_cuts_the_rate_after_patience_epochs_without_progress(prepared_project,
                                                                       small_base):
    # A step so small that validation accuracy cannot move: every epoch after the first is
    # "no improvement", so the rate drops by plateau_factor every plateau_patience epochs.
    params = with_train(load_params(), head_epochs=5, early_stopping_patience=0, head_lr=1e-6,
                        lr_schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    history, _ = head_history(prepared_project, params)
    assert len({row["val_accuracy"] for row in history}) == 1
    # Logged at epoch end before the cut of that epoch: epochs 0-2 at 1e-6, the cut after
    # epoch 2 (two epochs without progress), the next after epoch 4.
    assert lrs(history) == pytest.approx([1e-6, 1e-6, 1e-6, 5e-7, 5e-7], rel=1e-5)


def test_plateau_cut_and_counters_survive_a_resume(prepared_project, small_base):
    """Resumed from the state saved in the very epoch of a cut, the run goes on at the cut
    rate and cuts again when the unbroken run does."""
    import copy

    params = with_train(load_params(), head_epochs=6, early_stopping_patience=0, head_lr=1e-6,
                        lr_schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    saved = {}

    def save(row, tracker):  # what the stage's resume hook saves, when it saves it
        saved[row["epoch"]] = (copy.deepcopy(tracker.state), optimizer_state(tracker.optimizer))

    unbroken, _ = head_history(prepared_project, params, hooks=[save])
    assert lrs(unbroken) == pytest.approx([1e-6] * 3 + [5e-7] * 2 + [2.5e-7], rel=1e-5)
    state, arrays = saved[2]  # the cut came at the end of epoch 2
    resumed, _ = head_history(prepared_project, params, state=state, optimizer_arrays=arrays)
    assert lrs(resumed) == pytest.approx(lrs(unbroken), rel=1e-5)


@pytest.mark.parametrize(("name", "cls", "setting"), [
    ("adamw", keras.optimizers.AdamW, ("weight_decay", 0.05)),
    ("sgd", keras.optimizers.SGD, ("momentum", 0.8)),
])
def test_optimizer_choice_trains_with_its_own_setting(prepared_project, small_base, name, cls,
                                                      setting):
    params = with_train(load_params(), head_epochs=2, optimizer=name,
                        **{setting[0]: setting[1]})
    history, optimizer = head_history(prepared_project, params)
    assert type(optimizer) is cls
    assert float(getattr(optimizer, setting[0])) == pytest.approx(setting[1])
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)
    assert history[1]["loss"] != history[0]["loss"]  # it trained


def test_weight_decay_of_adamw_shrinks_weights_that_get_no_gradient():
    # What users pick AdamW for: decoupled decay, applied even where the loss is flat.
    train = TrainParams(optimizer="adamw", weight_decay=0.1, head_lr=0.1)
    from imgclf.training.phases import make_optimizer

    var = keras.Variable(np.ones(3, "float32"))
    make_optimizer(train, 0.1).apply_gradients([(np.zeros(3, "float32"), var)])
    assert np.allclose(var.numpy(), 1 - 0.1 * 0.1)
    var = keras.Variable(np.ones(3, "float32"))
    make_optimizer(TrainParams(optimizer="adam"), 0.1).apply_gradients(
        [(np.zeros(3, "float32"), var)])
    assert np.allclose(var.numpy(), 1.0)


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_balanced_class_weights_change_the_loss_on_unbalanced_data(project, small_base):
    make_class_folders(project / "data/raw", {"many": 24, "few": 6})
    set_params(project, model__image_size=75, model__weights=None, train__batch_size=4,
               train__head_lr=0.01)
    assert run_module("stages.prepare", project).returncode == 0
    params = with_train(load_params(), head_epochs=1)
    plain, _ = head_history(project, params)
    balanced, _ = head_history(project, with_train(params, class_weights="balanced"))
    assert balanced[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    # The weights themselves: n / (classes * count), so each class weighs the same in total.
    labels = np.array([0] * 16 + [1] * 4)
    weights = class_weights(labels, 2, "balanced")
    assert weights == pytest.approx({0: 20 / (2 * 16), 1: 20 / (2 * 4)})
    assert 16 * weights[0] == pytest.approx(4 * weights[1])
    assert class_weights(labels, 2, "none") is None


def test_label_smoothing_keeps_a_perfect_prediction_from_zero_loss():
    y = np.eye(3, dtype="float32")
    perfect = np.clip(y, 1e-7, 1.0)
    losses = {}
    for smoothing in (0.0, 0.2):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
        compile_model(model, "adam", TrainParams(label_smoothing=smoothing))
        losses[smoothing] = float(model.loss(y, perfect))
    assert losses[0.0] == pytest.approx(0.0, abs=1e-5)
    # Targets become 0.2/3 and 1 - 0.2 + 0.2/3: the loss of the one-hot answer is their
    # cross-entropy with it.
    expected = -(2 * (0.2 / 3) * math.log(1e-7) + (1 - 0.2 + 0.2 / 3) * math.log(1.0))
    assert losses[0.2] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("on", ["images", "stored activations"])
def test_phase_two_leaves_the_base_batchnorm_statistics_unchanged(tiny_project, on):
    params = with_train(load_params(), head_epochs=0, finetune_epochs=1)
    keras_setup(params)
    classes = read_classes()
    data = make_data(params, classes)
    clf = network.build_classifier(params.model, len(classes), None, seed=params.train.seed)
    if on == "stored activations":
        data.features = features.read(paths.FEATURES_DIR, params, data, clf)
    norms = [layer for layer in clf.base.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    before = [[v.numpy().copy() for v in (n.moving_mean, n.moving_variance)] for n in norms]
    tracker = Tracker(clf, TrackerState(), "val_accuracy", 0, tiny_project / "b.weights.h5",
                      [])
    start_finetune(clf, tracker, params.train.unfreeze)
    unfrozen = [w.numpy().copy() for w in clf.base.get_layer("conv_7b").weights]
    run_finetune_phase(clf, data, params.train, tracker)
    assert tracker.state.history[-1]["phase"] == "finetune"
    # The unfrozen top did learn...
    after_top = [w.numpy() for w in clf.base.get_layer("conv_7b").weights]
    assert any(not np.array_equal(a, b) for a, b in zip(unfrozen, after_top, strict=True))
    # ...while every BatchNorm statistic of the base stayed the pretrained one.
    for norm, (mean, var) in zip(norms, before, strict=True):
        np.testing.assert_array_equal(norm.moving_mean.numpy(), mean, err_msg=norm.name)
        np.testing.assert_array_equal(norm.moving_variance.numpy(), var, err_msg=norm.name)


def _train_size() -> int:
    from imgclf.data.manifests import read_manifest

    return len(read_manifest("train", read_classes())[0])
