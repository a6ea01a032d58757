"""The registered model deploys as MLflow deploys it: from its own declared environment.

What `mlflow models serve --env-manager uv|virtualenv`, `mlflow models build-docker` and
every deployment target do: a fresh environment made from the model's `requirements.txt`,
outside the project and outside our venv, loads the model and answers. uv installs from the
package index (a registry, not weights or data); its cache makes reruns fast.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import free_ports, run_module, set_params
from mlflow.tracking import MlflowClient

from imgclf.tracking.deployment import stop

UV = str(Path(sys.executable).parent / "uv")


def _clean_env(**extra) -> dict:
    """No trace of our venv: not on PATH, no PYTHONPATH, no project store."""
    venv_bin = str(Path(sys.executable).parent)
    path = ":".join(p for p in os.environ.get("PATH", "").split(":") if p != venv_bin)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MLFLOW_")}
    return {**env, "PATH": path, **extra}


def _test_images(project: Path) -> tuple[list[str], pd.DataFrame]:
    test = pd.read_csv(project / "data/prepared/test.csv")
    return [base64.b64encode((project / p).read_bytes()).decode() for p in test["path"]], test


def _predict_in_fresh_venv(model_dir: Path, images: list[str], tmp_path: Path) -> pd.DataFrame:
    """The model at `model_dir` loaded and asked in a fresh venv made from its own
    requirements.txt alone, as a deployment does; its answers (with probabilities)."""
    venv = tmp_path / "venv"
    env = _clean_env(VIRTUAL_ENV=str(venv))
    subprocess.run([UV, "venv", "-q", "--python", "3.11", str(venv)], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    subprocess.run([UV, "pip", "install", "-q", "-r", str(model_dir / "requirements.txt")],
                   check=True, env=env, cwd=tmp_path, timeout=900)
    (tmp_path / "images.json").write_text(json.dumps(images))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "images = json.load(open('images.json'))\n"
        "out = model.predict(pd.DataFrame({'image': images}), params={'probabilities': True})\n"
        "print(out.to_json(orient='records'))\n"
    )
    result = subprocess.run([str(venv / "bin/python"), "-c", script, str(model_dir)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecated" not in result.stderr.lower()
    return pd.DataFrame(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_registered_model_runs_in_a_fresh_venv_from_its_own_requirements(trained_project,
                                                                          tmp_path):
    if not (trained_project / "reports/metrics.json").is_file():
        assert run_module("stages.evaluate", trained_project).returncode == 0
    metrics = json.loads((trained_project / "reports/metrics.json").read_text())
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/imgclf/1",
                                                         dst_path=str(tmp_path / "model")))
    requirements = (model_dir / "requirements.txt").read_text().split()
    served_format = json.loads((model_dir / "artifacts/config.json").read_text())["format"]
    if served_format != "keras":
        # LiteRT or OpenVINO runs it: no TensorFlow (1.3 GB) in the deployment.
        assert not any(r.startswith(("tensorflow", "keras")) for r in requirements)
        engine = "ai-edge-litert==" if served_format.startswith("tflite") else "openvino=="
        assert any(r.startswith(engine) for r in requirements)
        # ... and it downloads what it serves with: the Keras model stays with the run.
        served = {"tflite_dynamic": "model_dynamic.tflite", "openvino": "float/model.xml",
                  "openvino_int8": "int8/model.xml"}[served_format]
        assert (model_dir / "artifacts" / served).is_file()
        assert not list(model_dir.rglob("*.keras"))
    # Only the serving code travels with the model, never training.
    code = {p.relative_to(model_dir / "code").as_posix()
            for p in (model_dir / "code").rglob("*.py")}
    assert "imgclf/serving/pyfunc.py" in code and "imgclf/data/images.py" in code
    assert not any(p.startswith(("imgclf/training", "imgclf/tracking", "imgclf/cli"))
                   for p in code)

    images, test = _test_images(trained_project)
    answers = _predict_in_fresh_venv(model_dir, images, tmp_path)
    # The answers evaluate measured, to the last digit.
    accuracy = float((answers["label"] == test["label"].astype(str)).mean())
    assert round(accuracy, 6) == metrics["accuracy"]
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    probs = np.array([json.loads(p) for p in answers["probabilities"]])
    labels = np.array([classes.index(str(c)) for c in test["label"]])
    from imgclf.metrics import summary_metrics

    assert round(summary_metrics(probs, labels)["log_loss"], 6) == metrics["log_loss"]


@pytest.mark.slow
def test_an_openvino_served_version_runs_in_a_fresh_venv_without_tensorflow(trained_project,
                                                                             tmp_path):
    # Registered under a name of its own (version 1 of `imgclf` stays what the other tests
    # read); the stage's report and params are put back afterwards.
    saved = {name: (trained_project / name).read_bytes()
             for name in ("params.yaml", "reports/register.json")}
    try:
        set_params(trained_project, mlflow__model_name="imgclf_ov",
                   mlflow__serving_format="openvino_int8")
        result = run_module("stages.register", trained_project)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for name, content in saved.items():
            (trained_project / name).write_bytes(content)
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/imgclf_ov/1",
                                                         dst_path=str(tmp_path / "model")))
    requirements = [r.split("==")[0] for r in
                    (model_dir / "requirements.txt").read_text().split()]
    assert "openvino" in requirements
    assert not any(r.startswith(("tensorflow", "keras", "ai-edge-litert"))
                   for r in requirements)
    assert (model_dir / "artifacts/int8/model.xml").is_file()
    assert not list(model_dir.rglob("*.keras")) and not list(model_dir.rglob("*.tflite"))
    images, _ = _test_images(trained_project)
    answers = _predict_in_fresh_venv(model_dir, images, tmp_path)
    # The same answers as the package stage's int8 copy run here, status included.
    local = mlflow.pyfunc.load_model("models:/imgclf_ov/1").predict(
        pd.DataFrame({"image": images}), params={"probabilities": True})
    assert list(answers["label"]) == list(local["label"])
    assert list(answers["status"]) == list(local["status"])
    np.testing.assert_allclose(np.array([json.loads(p) for p in answers["probabilities"]]),
                               np.array([json.loads(p) for p in local["probabilities"]]),
                               atol=1e-5)


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_builds_the_models_environment_and_answers(trained_project,
                                                                        tmp_path):
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("imgclf", "production", "1")
    port = free_ports()[0]
    venv_bin = str(Path(sys.executable).parent)  # uv, and mlflow itself, from our venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    start = time.monotonic()
    server = subprocess.Popen(
        [str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", "models:/imgclf@production",
         "--env-manager", "uv", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        images, test = _test_images(trained_project)
        deadline = time.monotonic() + 600
        answer = None
        while answer is None and time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                answer = _post(f"http://127.0.0.1:{port}/invocations",
                               {"dataframe_split": {"columns": ["image"],
                                                    "data": [[i] for i in images]},
                                "params": {"probabilities": True}})
            except OSError:
                time.sleep(1)
        assert answer is not None, "the server did not answer in 10 minutes"
        print(f"cold start (environment + load + first answer): "
              f"{time.monotonic() - start:.1f} s")
        predictions = pd.DataFrame(answer["predictions"])
        mlflow.set_tracking_uri(uri)
        local = mlflow.pyfunc.load_model("models:/imgclf/1").predict(
            pd.DataFrame({"image": images}), params={"probabilities": True})
        assert list(predictions["label"]) == list(local["label"])
        np.testing.assert_allclose(
            np.array([json.loads(p) for p in predictions["probabilities"]]),
            np.array([json.loads(p) for p in local["probabilities"]]), atol=1e-6)
    finally:
        stop(server)
