"""The register stage registers each trained model once, whatever kills it and however often
it reruns: the logged model and the version carry a key of what they hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, run_module, set_params
from mlflow.tracking import MlflowClient


def _client(project) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _logged_models(client, run_id: str) -> list:
    experiment_id = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment_id],
                                       filter_string=f"source_run_id = '{run_id}'")


def test_register_rerun_finds_the_version_it_made(trained_project):
    # Killed after MLflow registered, before reports/register.json was written: the rerun
    # reports the same version and logs nothing new.
    report_file = trained_project / "reports/register.json"
    first = json.loads(report_file.read_text())
    client = _client(trained_project)
    logged_before = len(_logged_models(client, first["run_id"]))
    report_file.unlink()
    result = run_module("stages.register", trained_project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reused, not registered again" in result.stdout
    assert json.loads(report_file.read_text()) == first
    versions = client.search_model_versions(f"name='imgclf' AND run_id='{first['run_id']}'")
    assert [str(v.version) for v in versions] == [str(first["model_version"])]
    assert len(_logged_models(client, first["run_id"])) == logged_before


def test_register_killed_between_logging_and_registering_logs_the_model_once(trained_project):
    # Another registered name registers again (without retraining); killed after the model
    # was logged to the run but before its version existed, the rerun registers that model.
    params, report_file = trained_project / "params.yaml", trained_project / "reports/register.json"
    saved = params.read_text(), report_file.read_text()
    run_id = json.loads(saved[1])["run_id"]
    client = _client(trained_project)
    logged_before = {m.model_id for m in _logged_models(client, run_id)}
    try:
        set_params(trained_project, mlflow__model_name="second")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLF_KILL_AT": "logged:model"}
        killed = subprocess.run([sys.executable, "-m", "stages.register"], cwd=trained_project,
                                env=env, capture_output=True, text=True, timeout=600)
        assert killed.returncode == -9, killed.stderr[-3000:]
        new = {m.model_id for m in _logged_models(client, run_id)} - logged_before
        assert len(new) == 1 and not client.search_model_versions("name='second'")

        result = run_module("stages.register", trained_project)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(report_file.read_text())
        assert report["registered_model"] == "second" and report["model_version"] == 1
        assert report["model_uri"] == f"models:/{new.pop()}"
        assert len(_logged_models(client, run_id)) == len(logged_before) + 1
    finally:
        params.write_text(saved[0])
        report_file.write_text(saved[1])
