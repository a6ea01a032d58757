"""Training as users rely on it: two phases, cached features, resume, MLflow, weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, free_ports, run_module, set_params
from mlflow.tracking import MlflowClient

from imgclf.model.network import WEIGHTS_FILE, WEIGHTS_URL, build_classifier, unfreeze_top
from imgclf.params import ModelParams, TrainParams


def small_model(num_classes=3, weights=None, dense_units=0):
    return build_classifier(ModelParams(image_size=75, weights=None, dense_units=dense_units),
                            num_classes, weights)


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_model_takes_raw_pixels_and_loads_in_safe_mode(tmp_path):
    clf = small_model()
    names = [layer.name for layer in clf.model.layers]
    assert names[:3] == ["pixels", "scale_to_unit", "inception_resnet_v2"]
    assert names[3:] == ["head_pool", "head_dropout", "head_logits"]
    path = tmp_path / "m.keras"
    clf.model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), clf.model.predict(x, verbose=0),
                               atol=1e-6)
    # The scaling inside is InceptionResNetV2's preprocess_input: x / 127.5 - 1.
    scale = keras.Model(clf.model.input, clf.model.get_layer("scale_to_unit").output)
    np.testing.assert_allclose(scale.predict(x, verbose=0),
                               keras.applications.inception_resnet_v2.preprocess_input(x.copy()),
                               atol=1e-5)


@pytest.mark.slow
def test_the_shipped_model_holds_the_trained_weights_and_no_optimizer(tmp_path):
    from imgclf.model.network import weights_digest
    from imgclf.params import Params
    from imgclf.training.session import shipped_copy

    clf = small_model()
    clf.base.trainable = False  # a cheap step: the optimizer's state is the head's
    clf.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (4, 75, 75, 3)).astype("float32")
    clf.model.fit(x, np.eye(3)[[0, 1, 2, 0]], epochs=1, verbose=0)  # optimizer state exists
    shipped = shipped_copy(clf, Params(), 3, distributed=False)
    path = tmp_path / "m.keras"
    shipped.model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert getattr(loaded, "optimizer", None) is None  # what serves, not what trained
    assert weights_digest(loaded) == weights_digest(clf.model)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), clf.model.predict(x, verbose=0),
                               atol=1e-6)


def test_unfreeze_top_block_keeps_batchnorm_frozen():
    clf = small_model()
    unfreeze_top(clf.base, "block8_9_ac")
    trainable = [layer for layer in clf.base.layers if layer.trainable and layer.weights]
    assert {layer.name for layer in trainable} >= {"block8_10_conv", "conv_7b"}
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert not clf.base.get_layer("block8_9_conv").trainable
    unfreeze_top(clf.base, 3)  # conv_7b, conv_7b_bn, conv_7b_ac: only conv_7b has weights
    assert [w.path.split("/")[-2] for w in clf.base.trainable_weights] == ["conv_7b"]


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_weights_from_a_local_file(tmp_path):
    """A notop weights file by path, in Keras 3 format and in the legacy .h5 of ImageNet's."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    source = keras.applications.InceptionResNetV2(include_top=False, weights=None,
                                                  input_shape=(75, 75, 3))
    modern = tmp_path / "base.weights.h5"
    source.save_weights(modern)
    legacy = tmp_path / WEIGHTS_FILE
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    for path in (modern, legacy):
        clf = small_model(weights=str(path))
        for mine, theirs in zip(clf.base.weights, source.weights, strict=True):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_offline_imagenet_fails_fast_and_says_what_to_do(project, tmp_path):
    start = time.monotonic()
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert WEIGHTS_FILE in result.stderr and WEIGHTS_URL in result.stderr
    assert str(tmp_path / "keras" / "models") in result.stderr and "null" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30


def test_stored_features_give_the_full_models_answers(tiny_project):
    """Phase 1's head on the pooled features, and phase 2's top + head on the activations at
    the cut, answer as the whole model does on the images (float16 storage: within 1e-3).
    Both storage types in one test: one model built, one project prepared."""
    from imgclf import features, paths
    from imgclf.data.manifests import read_classes
    from imgclf.params import load_params
    from imgclf.training.phases import on_cut_activations
    from imgclf.training.session import make_data

    clf = plain = None
    for dtype in ("float32", "float16"):
        set_params(tiny_project, features__dtype=dtype)
        assert run_module("stages.features", tiny_project).returncode == 0
        params = load_params()
        data = make_data(params, read_classes())
        if clf is None:
            clf = build_classifier(params.model, 3, None, seed=5)  # another head, same base
            plain = clf.model.predict(data.make_images(data.val_files, None, False, None),
                                      verbose=0)
        stored = features.read(paths.FEATURES_DIR, params, data, clf)
        everything = np.arange(len(data.val_files))
        first_view = np.zeros_like(everything)
        pooled = stored.reader("val", "pooled").read(first_view, everything)
        np.testing.assert_allclose(clf.feature_head().predict(pooled, verbose=0), plain,
                                   atol=1e-6)
        cut = stored.reader("val", "cut").read(first_view, everything)
        assert cut.shape[1:] == (1, 1, 2080)  # block8_9's output at 75 px
        on_cut = on_cut_activations(clf, stored.top).predict(cut, verbose=0)
        np.testing.assert_allclose(on_cut, plain, atol=1e-6 if dtype == "float32" else 1e-3,
                                   err_msg=dtype)


def test_features_stage_says_its_size_and_refuses_above_its_budget(prepared_project):
    set_params(prepared_project, features__max_gb=1e-6)
    refused = run_module("stages.features", prepared_project)
    assert refused.returncode == 2
    message = refused.stderr.strip().splitlines()[-1]
    assert "features.max_gb" in message and "features.cache false" in message
    assert "Traceback" not in refused.stderr
    assert not (prepared_project / "data/features").exists()
    set_params(prepared_project, features__max_gb=1)
    stored = run_module("stages.features", prepared_project)
    assert stored.returncode == 0 and "features: storing 0.2 MB" in stored.stdout


def test_train_refuses_features_made_for_other_params(tiny_project):
    set_params(tiny_project, model__image_size=96)  # the stored arrays are of 75 px images
    refused = run_module("stages.train", tiny_project)
    assert refused.returncode == 2
    assert "image_size" in refused.stderr and "features stage again" in refused.stderr
    assert not (tiny_project / "models/model.keras").exists()


def test_best_checkpoint_across_phases_survives_a_worse_finetune(tmp_path):
    from imgclf.training.phases import Tracker, TrackerState, finish, start_finetune

    clf = small_model()
    clf.model.compile(optimizer="adam", loss="categorical_crossentropy")
    tracker = Tracker(clf, TrackerState(), "val_accuracy", 0, tmp_path, [])
    tracker.set_model(clf.model)
    head = clf.model.get_layer("head_logits")
    for epoch, val_acc in enumerate([0.5, 0.8]):
        head.kernel.assign(np.full(head.kernel.shape, epoch, "float32"))
        tracker.on_epoch_begin(epoch)
        tracker.on_epoch_end(epoch, {"val_accuracy": val_acc, "accuracy": 0.1, "loss": 1.0})
    start_finetune(clf, tracker, "block8_9_ac")
    assert tracker.state.phase == "finetune"
    head.kernel.assign(np.full(head.kernel.shape, 9, "float32"))  # fine-tune makes it worse
    top_weight = clf.base.get_layer("conv_7b").kernel  # ...of the unfrozen top too
    before = top_weight.numpy().copy()
    top_weight.assign(before + 1.0)
    tracker.on_epoch_begin(2)
    tracker.on_epoch_end(2, {"val_accuracy": 0.1, "accuracy": 0.9, "loss": 0.1})
    finish(clf, tracker)
    assert tracker.state.best_epoch == 1
    assert float(head.kernel.numpy().mean()) == 1.0  # the head of epoch 1
    np.testing.assert_array_equal(top_weight.numpy(), before)  # and the top it had then
    # Phase 1's checkpoints hold the head alone; the best that phase 2 may fall back on
    # holds what phase 2 changes (the head and the unfrozen top), not the whole model.
    assert tracker.best_path == tmp_path / "best-top-0001.weights.h5"
    assert (tmp_path / "best-head-0001.weights.h5").stat().st_size < \
        tracker.best_path.stat().st_size / 4
    whole = tmp_path / "whole.weights.h5"
    clf.model.save_weights(whole)
    assert tracker.best_path.stat().st_size < whole.stat().st_size / 4


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_phase_two_checkpoint_loads_into_a_model_built_again(tmp_path):
    """A resumed run rebuilds the model in a fresh process, with other layer names and the
    base frozen again: the phase-2 checkpoint still restores the weights it holds."""
    from imgclf.training.phases import ChangingWeights

    clf = small_model()
    unfreeze_top(clf.base, "block8_9_ac")
    for variable in clf.model.trainable_weights:
        variable.assign(np.full(variable.shape, 0.5, "float32"))
    ChangingWeights(clf.model).save_weights(tmp_path / "top.weights.h5")
    again = small_model()  # Keras numbers this one's layers on from the first's
    ChangingWeights(again.model).load_weights(tmp_path / "top.weights.h5")
    x = np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    np.testing.assert_allclose(again.model.predict(x, verbose=0),
                               clf.model.predict(x, verbose=0), atol=1e-6)


def _history(project):
    return pd.read_csv(project / "reports/plots/train_history.csv")


def test_train_stage_logs_and_registers_in_mlflow(trained_project):
    # The session's trained project (its train stage ran with the tiny params); nothing here
    # depends on what other tests later log to the run.
    report = {**json.loads((trained_project / "reports/train.json").read_text()),
              **json.loads((trained_project / "reports/register.json").read_text())}
    assert str(report["model_version"]) == "1"
    assert report["model_uri"].startswith("models:/m-")
    history = _history(trained_project)
    assert list(history["phase"]) == ["head", "finetune"]
    metrics = json.loads((trained_project / "reports/train_metrics.json").read_text())
    assert metrics["best_epoch"] in (0, 1) and "val_accuracy" in metrics

    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.finetune_lr"] == str(TrainParams().finetune_lr)
    assert run.data.params["model.image_size"] == "75"
    assert {"git_commit", "data_version"} & set(run.data.tags) == {"data_version"}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [0, 1]
    for name in ("accuracy", "top5_accuracy", "loss", "val_loss", "learning_rate"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_history.csv", "classes.json", "train_metrics.json"} <= artifacts
    version = client.get_model_version("imgclf", "1")
    assert version.run_id == run.info.run_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert experiment.artifact_location.startswith("file://")

    # The registered model holds the very model train wrote (what it serves with, and how
    # close that is to Keras: tests/test_serving.py and tests/test_bad_input.py).
    from imgclf.model.network import weights_digest

    mlflow.set_tracking_uri(uri)
    inner = mlflow.pyfunc.load_model("models:/imgclf/1").unwrap_python_model()
    assert weights_digest(inner.model) == report["weights_digest"]
    assert inner.classes == json.loads(
        (trained_project / "data/prepared/classes.json").read_text())


def _train_until_killed(project: Path, epochs_done: int) -> int:
    """Start the train stage, SIGKILL it once `epochs_done` epochs are checkpointed (or
    later: the kill lands mid-epoch); the epochs its checkpoint holds."""
    state_file = project / "models/checkpoints/last/state.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = project / f"killed-{epochs_done}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.is_file() and (json.loads(state_file.read_text())["state"]["epochs_done"]
                                     >= epochs_done):
            break
        time.sleep(0.05)
    assert proc.poll() is None, log.read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models/model.keras").exists()
    return json.loads(state_file.read_text())["state"]["epochs_done"]


@pytest.mark.slow
def test_training_killed_twice_ends_as_an_uninterrupted_one(tiny_project, tmp_path_factory):
    # Both phases, cached features and augmentation on; killed once in each phase.
    # val_loss: on this tiny set it moves every epoch (val_accuracy sits at chance), so the
    # best epoch, and the shipped weights, come late.
    set_params(tiny_project, train__head_epochs=2, train__finetune_epochs=2,
               train__early_stopping_patience=0, train__deterministic=True,
               train__monitor="val_loss")
    reference = tmp_path_factory.mktemp("uninterrupted") / "project"
    shutil.copytree(tiny_project, reference)
    # Alongside (deterministic ops: sharing the CPU changes the timing, not the numbers).
    with (reference / "train.log").open("w") as log:
        uninterrupted = subprocess.Popen(
            [sys.executable, "-m", "stages.train"], cwd=reference, stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    state_file = tiny_project / "models/checkpoints/last/state.json"
    done = _train_until_killed(tiny_project, 1)
    killed_run = json.loads(state_file.read_text())["run_id"]
    if done < 3:  # the first kill landed in phase 1: kill phase 2 too, after its first epoch
        done = _train_until_killed(tiny_project, 3)
    result = run_module("stages.train", tiny_project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (reference / "train.log").read_text()[-3000:]
    assert f"resuming MLflow run {killed_run} after epoch {done}" in result.stdout

    report = json.loads((tiny_project / "reports/train.json").read_text())
    expected = json.loads((reference / "reports/train.json").read_text())
    assert report["run_id"] == killed_run
    history, expected_history = _history(tiny_project), _history(reference)
    assert list(history["epoch"]) == list(range(4))
    for column in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert list(history[column]) == list(expected_history[column]), column
    assert report["best_epoch"] == expected["best_epoch"]
    assert report["weights_digest"] == expected["weights_digest"]
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_run(killed_run).info.experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(killed_run, "loss"))
    assert steps == list(range(4))
    assert not state_file.exists()  # a finished run leaves nothing to resume


def _train_killed_at(project: Path, point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLF_KILL_AT": point}
    return subprocess.run([sys.executable, "-m", "stages.train"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kills_between_saving_and_logging_leave_every_epoch_logged_once(tiny_project):
    """Killed right after an epoch's metrics went to MLflow, or right after its resume state
    was saved: either way the finished run holds each epoch once, with the values the
    history has. And a resume whose run was deleted meanwhile says so."""
    set_params(tiny_project, train__head_epochs=2, train__finetune_epochs=1,
               train__early_stopping_patience=0)
    state_file = tiny_project / "models/checkpoints/last/state.json"
    killed = _train_killed_at(tiny_project, "logged:0")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_id = json.loads(state_file.read_text())["run_id"]
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    client.delete_run(run_id)
    refused = run_module("stages.train", tiny_project)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"MLflow run {run_id}, which was deleted" in refused.stderr
    assert f"mlflow runs restore --run-id {run_id}" in refused.stderr
    client.restore_run(run_id)

    killed = _train_killed_at(tiny_project, "saved:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"resuming MLflow run {run_id} after epoch 1" in killed.stdout
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0]

    result = run_module("stages.train", tiny_project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming MLflow run {run_id} after epoch 2" in result.stdout
    history = _history(tiny_project)
    for key in ("loss", "val_loss", "accuracy"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [step for step, _ in logged] == [0, 1, 2], key
        assert np.allclose([value for _, value in logged], history[key]), key


def test_unreachable_tracking_server_fails_before_training(tiny_project):
    port = free_ports()[0]  # nobody listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tiny_project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"http://127.0.0.1:{port}" in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr and "Epoch" not in result.stdout
    assert time.monotonic() - start < 30
    assert not (tiny_project / "models/checkpoints").exists()


def test_corrupt_resume_checkpoint_restarts_cleanly_with_a_warning(tiny_project):
    from imgclf.data.manifests import data_version
    from imgclf.params import load_params
    from imgclf.training import resume

    # Also: a model trained in mixed precision ships in float32.
    set_params(tiny_project, train__head_epochs=2, train__finetune_epochs=0,
               train__precision="mixed_bfloat16")
    last = tiny_project / "models/checkpoints/last"
    last.mkdir(parents=True)
    fp = resume.fingerprint(load_params().flat(), data_version())
    (last / "state.json").write_text(json.dumps(
        {"fingerprint": fp, "run_id": None,
         "state": {"phase": "head", "epochs_done": 1, "head_epochs_run": 1, "best": 0.5,
                   "best_epoch": 0, "wait": 0, "history": []}}))
    (last / "model.weights.h5").write_bytes(b"half-written garbage")
    result = run_module("stages.train", tiny_project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume checkpoint" in result.stderr and "from scratch" in result.stderr
    assert list(_history(tiny_project)["epoch"]) == [0, 1]
    shipped = keras.models.load_model(tiny_project / "models/model.keras", safe_mode=True)
    assert {layer.dtype_policy.name for layer in shipped.layers} == {"float32"}


def test_cached_views_are_drawn_per_image_per_epoch(tmp_path):
    from imgclf.features import RowReader, row_dataset

    views, n = 3, 40
    np.save(tmp_path / "rows.npy", np.stack([np.full((n, 4), v, np.float16)
                                              for v in range(views)]))
    onehot = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
    ds = row_dataset(RowReader(tmp_path / "rows.npy"), onehot, batch_size=8,
                     order=keras.random.SeedGenerator(1))
    drawn = np.concatenate([x.numpy()[:, 0] for x, _ in ds])
    assert len(drawn) == n and set(drawn) <= {0.0, 1.0, 2.0} and len(set(drawn)) > 1
