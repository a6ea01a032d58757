"""The DVC pipeline as users run it, in a temporary git + DVC repository."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, make_class_folders, set_params, sh
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_repro_then_temp_experiment_land_in_one_mlflow_store(dvc_repo):
    make_class_folders(dvc_repo / "data/raw", {"cat": 7, "dog": 7})
    set_params(dvc_repo, **TINY)
    sh(["dvc", "add", "data/raw"], dvc_repo)
    sh(["git", "add", "-A"], dvc_repo)
    sh(["git", "commit", "-q", "-m", "data and tiny params"], dvc_repo)

    first = sh(["dvc", "repro"], dvc_repo)
    for stage in ("prepare", "augment_preview", "train"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (dvc_repo / "reports/augment_preview.png").stat().st_size > 1000
    assert "Running stage" not in sh(["dvc", "repro"], dvc_repo).stdout
    metrics = sh(["dvc", "metrics", "show", "--json"], dvc_repo).stdout
    assert "val_accuracy" in metrics
    sh(["git", "add", "-A"], dvc_repo)
    sh(["git", "commit", "-q", "-m", "first run"], dvc_repo)

    # An experiment in a temporary copy of the workspace (.dvc/tmp/exps/...) must log to the
    # repository's own store, under the experiment's name.
    sh(["dvc", "exp", "run", "--temp", "-n", "higher-lr", "-S", "train.head_lr=0.05"],
       dvc_repo)
    uri = f"sqlite:///{dvc_repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("imgclf")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert len(runs) == 2 and "higher-lr" in by_name
    exp_run = by_name["higher-lr"]
    assert exp_run.data.params["train.head_lr"] == "0.05"
    assert exp_run.data.tags["dvc_exp_name"] == "higher-lr"
    assert exp_run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(exp_run.info.run_id)}
    assert {"augment_preview.png", "train_curves.png"} <= artifacts
    versions = client.search_model_versions("name='imgclf'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {run.info.run_id for run in runs}
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], dvc_repo).stdout)
    assert "higher-lr" in json.dumps(shown)
