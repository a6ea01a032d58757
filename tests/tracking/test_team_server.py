"""A team tracking server: MLflow on PostgreSQL with served artifacts and basic auth.

PostgreSQL is Debian's package (`.ci/run` installs it when missing); the test starts its own
cluster on 127.0.0.1 in a temporary folder and removes it afterwards. The scenario is the bad
day the README promises to survive: the server goes away mid-run and comes back.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_ports, set_params

PASSWORD = "s3cret-pg"
ADMIN = ("admin", "s3cret-admin")


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with databases for MLflow and its auth."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("IMGCLF_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # PostgreSQL refuses to run as root; as root, run it as the package's `postgres` user in
    # a folder that user owns (pytest's tmp_path is private to root).
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))
    (base / "pw").write_text(PASSWORD)
    if as_user:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pw", "postgres")
    port = free_ports()[0]
    data = base / "data"

    def pg(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={base / 'pw'}",
       "-A", "scram-sha-256")
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
       f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
            conn.execute("CREATE DATABASE mlflow_auth")
        yield f"postgresql://mlflow:{PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


class Server:
    """`mlflow server` with basic auth, a PostgreSQL store and served artifacts."""

    def __init__(self, pg_uri: str, root: Path):
        self.port = free_ports()[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "served-artifacts"
        self.auth_ini = root / "auth.ini"
        self.auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {pg_uri}/mlflow_auth\nadmin_username = {ADMIN[0]}\n"
            f"admin_password = {ADMIN[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        self.pg_uri = pg_uri
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_ini),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
        env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"{self.pg_uri}/mlflow", "--serve-artifacts",
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited:\n{self.proc.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start in 180 s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _env(server: Server, credentials: tuple[str, str] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=server.url,
               # A lost server should be noticed in seconds here, not after minutes of retries.
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    if credentials:
        env.update(MLFLOW_TRACKING_USERNAME=credentials[0],
                   MLFLOW_TRACKING_PASSWORD=credentials[1])
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_team_server_with_auth_survives_losing_the_server_mid_run(postgres, tiny_project,
                                                                  tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    server = Server(postgres, tmp_path)
    server.start()
    set_params(tiny_project, train__finetune_epochs=2)

    # Basic auth: no credentials, no service, and the stage says what to set.
    refused = _run(["stages.train"], tiny_project, _env(server, None))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "MLFLOW_TRACKING_USERNAME" in refused.stderr and "Traceback" not in refused.stderr
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert http.value.code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(server.url, server.url)

    # Train with credentials; the server dies after the first epoch reached it.
    train = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tiny_project,
                             env=_env(server, ADMIN), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline and train.poll() is None:
        experiment = admin.get_experiment_by_name("imgclf")
        runs = admin.search_runs([experiment.experiment_id]) if experiment else []
        if runs and admin.get_metric_history(runs[0].info.run_id, "loss"):
            run_id = runs[0].info.run_id
            break
        time.sleep(0.3)
    assert run_id, "the first epoch never reached the server"
    server.kill()
    out, err = train.communicate(timeout=600)
    assert train.returncode == 1, err[-3000:]
    assert "was lost" in err and "imgclf relog" in err and "Traceback" not in err
    assert (tiny_project / "models/model.keras").is_file()
    assert (tiny_project / "reports/plots/train_history.csv").is_file()
    assert (tiny_project / "models/mlflow_pending.json").is_file()
    assert not (tiny_project / "reports/train.json").exists()
    epochs_on_disk = json.loads((tiny_project / "models/mlflow_pending.json").read_text())
    epochs_on_disk = [row["epoch"] for row in epochs_on_disk["history"]]
    assert epochs_on_disk == [0, 1, 2]

    # The server comes back (same database, same artifact store): relog sends the rest.
    server.start()
    relog = _run(["imgclf.cli.main", "relog"], tiny_project, _env(server, ADMIN))
    assert relog.returncode == 0, relog.stderr[-3000:]
    report = json.loads((tiny_project / "reports/train.json").read_text())
    assert report["run_id"] == run_id
    assert not (tiny_project / "models/mlflow_pending.json").exists()
    run = admin.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in ("loss", "val_accuracy"):
        steps = sorted(m.step for m in admin.get_metric_history(run_id, metric))
        assert steps == epochs_on_disk, (metric, steps)  # every epoch, once
    assert "train_history.csv" in [a.path for a in admin.list_artifacts(run_id)]

    # Register, evaluate and promote against the server; the alias resolves there.
    for args in (["stages.selective"], ["stages.package"], ["stages.register"],
                 ["stages.evaluate"], ["imgclf.cli.main", "promote", "--latest"]):
        result = _run(args, tiny_project, _env(server, ADMIN))
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    report = json.loads((tiny_project / "reports/register.json").read_text())
    production = admin.get_model_version_by_alias("imgclf", "production")
    assert str(production.version) == str(report["model_version"])
    assert "test_accuracy" in admin.get_run(run_id).data.metrics

    # A client without credentials is refused by the same server.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException):
        MlflowClient(server.url, server.url).get_model_version_by_alias("imgclf", "production")
    server.kill()
