"""train.strategy: TensorFlow's own engines; a two-worker cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, free_ports, run_module, set_params

from imgclf.errors import UserError
from imgclf.training.distribute import choose, cluster_from_env


def test_auto_picks_the_engine_from_the_cluster_and_the_gpus():
    assert choose("auto", gpu_count=0, cluster=None) == "none"
    assert choose("auto", gpu_count=1, cluster=None) == "none"
    assert choose("auto", gpu_count=4, cluster=None) == "mirrored"
    assert choose("auto", gpu_count=4, cluster=(1, 3)) == "multi_worker"
    assert choose("auto", gpu_count=0, cluster=(0, 1)) == "none"
    assert choose("mirrored", gpu_count=0, cluster=None) == "mirrored"
    with pytest.raises(UserError, match="TF_CONFIG"):
        choose("multi_worker", gpu_count=0, cluster=None)


def test_tf_config_is_read_and_checked(monkeypatch):
    cluster = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert cluster_from_env() == (1, 2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 5}}))
    with pytest.raises(UserError, match="index 5"):
        cluster_from_env()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UserError, match="TF_CONFIG is not valid"):
        cluster_from_env()


def test_multi_worker_without_tf_config_is_a_user_error(tiny_project):
    set_params(tiny_project, train__strategy="multi_worker")
    result = run_module("stages.train", tiny_project)
    assert result.returncode == 2
    assert "train.strategy = 'multi_worker' needs TF_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_workers_train_in_sync_and_only_the_chief_logs(tiny_project, tmp_path):
    import keras
    from mlflow.tracking import MlflowClient

    from imgclf.model.network import weights_digest

    run_module("stages.augment_preview", tiny_project)
    set_params(tiny_project, train__strategy="multi_worker")
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    procs = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(worker_tmp),
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tiny_project,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        outputs.append(out)
    for index, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"worker {index}:\n{out[-3000:]}"

    digests = [re.search(r"worker \d of 2 finished; weights digest (\w+)", out).group(1)
               for out in outputs]
    assert digests[0] == digests[1]  # both replicas hold the same weights
    report = json.loads((tiny_project / "reports/train.json").read_text())
    assert report["strategy"] == "multi_worker" and report["workers"] == 2
    assert report["trained_weights_digest"] == digests[0]
    saved = keras.models.load_model(tiny_project / "models/model.keras", safe_mode=True)
    assert weights_digest(saved) == report["weights_digest"]
    # Only the chief logged: one run in the store; the worker's checkpoints are gone.
    client = MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imgclf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert list(worker_tmp.glob("imgclf-worker*")) == []
