"""`imgclf ui` / `make ui`: the MLflow UI on the project's store, bound to 127.0.0.1.

MLflow 3.17's UI opens experiments in its GenAI view unless told otherwise; the URL printed
here asks for the model-training view (`workflowType=machine_learning`), where runs, params,
metrics, curves and artifacts are.
"""

from __future__ import annotations

import os
import shutil
import sys

from imgclf.params import load_params
from imgclf.tracking import store


def experiment_url(host: str, port: int, experiment_id: str | None) -> str:
    base = f"http://{host}:{port}/"
    if experiment_id is None:
        return f"{base}#/experiments?workflowType=machine_learning"
    return f"{base}#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def command(host: str, port: int) -> list[str]:
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [mlflow, "ui", "--host", host, "--port", str(port)]
    if store.uses_embedded_store():
        root = store.project_root()
        cmd += ["--backend-store-uri", store.tracking_uri(),
                "--default-artifact-root", (root / store.ARTIFACTS_DIR).as_uri()]
    else:
        cmd += ["--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"]]
    return cmd


def main(host: str = "127.0.0.1", port: int = 5000) -> None:
    params = load_params()
    client = store.make_client()
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    url = experiment_url(host, port, experiment.experiment_id if experiment else None)
    print(f"MLflow UI on {store.tracking_uri()}\n  open {url}\n  (Ctrl-C stops it)",
          flush=True)
    cmd = command(host, port)
    os.execv(cmd[0], cmd)
