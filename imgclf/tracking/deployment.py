"""What serving a registered version costs: its environment's size, the cold start of
`mlflow models serve` (process start to first answer) and images/s at 32 images a request.

Used by the export stage (reports/export.json) and `make bench`. It drives a real server
process over HTTP on 127.0.0.1, so it measures what a client meets.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from imgclf.stage_reports import RegisterReport

IMAGES_PER_REQUEST = 32


def environment_mb(requirements: list[str]) -> float:
    """Installed size of the requirements and everything they pull in, as installed here:
    what a fresh environment made from them holds (its own pip and Python aside)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    total = 0
    pending = [Requirement(r).name for r in requirements]
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        total += sum(f.size or 0 for f in dist.files or [])
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                pending.append(req.name)
    return round(total / 1e6, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """End a server process: politely, then for sure."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)


def serve_figures(model_uri: str, tracking_uri: str, files: list[str], cwd: Path,
                  rounds: int = 5, timeout: float = 300.0) -> dict:
    """Cold start and throughput of `mlflow models serve --env-manager local` (this
    environment: the model's own would add its one-off build) for `model_uri`."""
    images = [base64.b64encode(Path(f).read_bytes()).decode("ascii")
              for f in (files * IMAGES_PER_REQUEST)[:IMAGES_PER_REQUEST]]
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[i] for i in images]}}).encode()
    port = _free_port()
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    start = time.perf_counter()
    server = subprocess.Popen(
        [str(mlflow_exe), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
             "PATH": f"{mlflow_exe.parent}:{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post() -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    try:
        while True:
            try:
                post()
                break
            except OSError:
                if time.perf_counter() - start > timeout or server.poll() is not None:
                    raise RuntimeError(f"mlflow models serve -m {model_uri} did not answer "
                                       f"within {timeout:.0f} s") from None
                time.sleep(0.2)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(rounds):
            post()
        per_s = rounds * IMAGES_PER_REQUEST / (time.perf_counter() - start)
    finally:
        stop(server)
    return {"cold_start_seconds": round(cold, 2), "images_per_s_batch32": round(per_s, 1)}


def _logged_file(registered: RegisterReport, rel: str) -> Path:
    """File `rel` of the registered version's logged model, as MLflow stores it (a copy in
    a temporary folder)."""
    import mlflow

    from imgclf.tracking import store

    model_id = registered.model_uri.removeprefix("models:/")
    location = store.make_client().get_logged_model(model_id).artifact_location
    store.use_fluent()
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location.rstrip('/')}/{rel}"))


def registered_serving(registered: RegisterReport, files: list[str], cwd: Path) -> dict:
    """The serving figures of the registered version (reports/register.json), for
    reports/export.json."""
    from imgclf.tracking import store

    requirements = _logged_file(registered, "requirements.txt").read_text(
        encoding="utf-8").split()
    version_uri = registered.version_uri
    return {"model": version_uri, "requirements": requirements,
            "environment_mb": environment_mb(requirements),
            **serve_figures(version_uri, store.tracking_uri(), files, cwd)}
