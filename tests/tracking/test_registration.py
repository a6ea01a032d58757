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


def test_auto_serves_the_fastest_copy_that_agrees_as_package_timed_them(trained_project,
                                                                       monkeypatch):
    import dataclasses

    import pytest

    from imgclf.errors import UserError
    from imgclf.params import load_params
    from imgclf.stage_reports import PackageReport
    from imgclf.tracking.registration import serving_format

    monkeypatch.chdir(trained_project)
    params, package = load_params(), PackageReport.read()
    assert set(package.candidates) == {"tflite_dynamic", "openvino", "openvino_int8"}
    timed = {f: c["images_per_s"] for f, c in package.candidates.items()}
    assert all(v > 0 for v in timed.values())

    def agreeing(report, *formats):  # only `formats` reach the agreement gate
        return dataclasses.replace(report, candidates={
            f: {**c, "agrees": f in formats} for f, c in report.candidates.items()})

    # A random-init model's agreement is not what this test is about: it sets who agrees.
    everyone = agreeing(package, *package.candidates)
    fmt, speeds = serving_format(params, everyone)
    assert speeds == timed and fmt == max(timed, key=timed.get)  # register times nothing
    # A copy below the gate is not served, however fast it is.
    slowest = min(timed, key=timed.get)
    assert serving_format(params, agreeing(package, slowest)) == (slowest, timed)
    # One copy made: served without a choice; none agrees: Keras.
    only = dataclasses.replace(everyone, candidates={
        slowest: everyone.candidates[slowest]})
    assert serving_format(params, only) == (slowest, {})
    assert serving_format(params, agreeing(package)) == ("keras", {})
    # A named format serves as named, if package made it; else the user hears which exist.
    named = params.model_copy(update={"mlflow": params.mlflow.model_copy(
        update={"serving_format": "openvino_int8"})})
    assert serving_format(named, agreeing(package)) == ("openvino_int8", {})
    only_tflite = dataclasses.replace(package, candidates={
        "tflite_dynamic": package.candidates["tflite_dynamic"]})
    with pytest.raises(UserError, match="mlflow.serving_format = openvino_int8.*"
                                        "package.openvino"):
        serving_format(named, only_tflite)


def test_a_served_copys_environment_names_its_engine_and_no_tensorflow():
    from imgclf.tracking.registration import requirements

    for fmt, engine in (("tflite_dynamic", "ai-edge-litert"), ("openvino", "openvino"),
                        ("openvino_int8", "openvino"), ("keras", "tensorflow")):
        names = [r.split("==")[0] for r in requirements(fmt)]
        assert names[:4] == ["mlflow-skinny", "numpy", "pandas", "pillow"]
        assert engine in names
        assert ("tensorflow" in names) == (fmt == "keras")
