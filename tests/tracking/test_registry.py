"""Promotion behind a metric gate, audited and reversible, safe under concurrent promotes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from imgclf.tracking import registry


@pytest.fixture
def store(tmp_path):
    """A temporary SQLite registry with versions 1-3 carrying test metrics (as evaluate sets)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("dogs")
    metrics = {"1": (0.50, 1.2), "2": (0.90, 0.4), "3": (0.70, 0.8)}
    for version, (acc, loss) in metrics.items():
        mv = client.create_model_version("dogs", source=str(tmp_path / f"m{version}"))
        assert str(mv.version) == version
        client.set_model_version_tag("dogs", version, "test_accuracy", str(acc))
        client.set_model_version_tag("dogs", version, "test_log_loss", str(loss))
    client.create_model_version("dogs", source=str(tmp_path / "m4"))  # 4: never evaluated
    return client, tmp_path, uri


def test_gate_audit_and_rollback(store):
    client, root, _ = store
    first = registry.promote(client, "dogs", "1", "production", "test_accuracy", 0.0, False)
    assert first.promoted and first.previous is None
    assert registry.promote(client, "dogs", "2", "production", "test_accuracy", 0.0, False).promoted
    with pytest.raises(registry.GateFailed) as err:
        registry.promote(client, "dogs", "3", "production", "test_accuracy", 0.0, False)
    assert "0.7" in str(err.value) and "0.9" in str(err.value)
    assert str(client.get_model_version_by_alias("dogs", "production").version) == "2"
    with pytest.raises(registry.GateFailed, match="no test_accuracy"):
        registry.promote(client, "dogs", "4", "production", "test_accuracy", 0.0, False)
    audit = client.get_model_version("dogs", "2").tags
    assert audit["audit.from_version"] == "1" and audit["audit.metric"] == "test_accuracy"
    assert audit["audit.candidate_value"] == "0.9" and audit["audit.previous_value"] == "0.5"
    assert audit["audit.by"] and audit["audit.at"] and audit["audit.forced"] == "false"

    forced = registry.promote(client, "dogs", "3", "production", "test_accuracy", 0.0, True)
    assert forced.forced
    assert client.get_model_version("dogs", "3").tags["audit.forced"] == "true"
    back = registry.rollback(client, "dogs", "production")
    assert (back.previous, back.candidate) == ("3", "2")
    assert str(client.get_model_version_by_alias("dogs", "production").version) == "2"
    assert client.get_model_version("dogs", "2").tags["audit.action"] == "rollback"


def test_lower_is_better_and_min_delta(store):
    client, root, _ = store
    registry.promote(client, "dogs", "3", "staging", "test_log_loss", 0.0, False)
    with pytest.raises(registry.GateFailed):  # 1.2 is a worse loss than 0.8
        registry.promote(client, "dogs", "1", "staging", "test_log_loss", 0.0, False)
    with pytest.raises(registry.GateFailed):  # 0.4 beats 0.8 by 0.4 < 0.5
        registry.promote(client, "dogs", "2", "staging", "test_log_loss", 0.5, False)
    assert registry.promote(client, "dogs", "2", "staging", "test_log_loss", 0.3, False).promoted
    assert registry.lower_is_better("test_ece")
    assert registry.lower_is_better("test_ece_uncalibrated")
    assert not registry.lower_is_better("test_accuracy")


def imgclf(cwd: Path, uri: str, *args: str):
    exe = Path(sys.executable).parent / "imgclf"
    return subprocess.Popen([str(exe), *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ,
                                                         "MLFLOW_TRACKING_URI": uri})


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_cli_exit_codes_and_concurrent_promotes(store):
    client, root, uri = store
    done = imgclf(root, uri, "promote", "--name", "dogs", "--version", "1")
    assert done.wait(120) == 0
    for _ in range(2):
        # v3 (0.7) and v2 (0.9) at once: whatever the order, the alias must end on v2;
        # without serialisation v3 could land after v2 passed, on a stale gate.
        racers = [imgclf(root, uri, "promote", "--name", "dogs", "--version", v)
                  for v in ("3", "2")]
        for proc in racers:
            proc.wait(120)
        assert str(client.get_model_version_by_alias("dogs", "production").version) == "2"
    refused = imgclf(root, uri, "promote", "--name", "dogs", "--version", "3")
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "stays on 2" in err
    table = imgclf(root, uri, "models", "--name", "dogs")
    out, _ = table.communicate(timeout=120)
    assert "production" in out and "0.9" in out
    missing = imgclf(root, uri, "promote", "--name", "cats")
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "Traceback" not in err
    # The promote lock lives in the temp folder, not in the user's project (where `git status`
    # would show it).
    assert not [p.name for p in root.iterdir() if "lock" in p.name]
