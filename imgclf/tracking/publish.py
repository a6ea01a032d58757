"""What a finished training sends MLflow: the epochs it missed, its artifacts, timings and
calibration; then the run is FINISHED. (The model is logged and registered by the `register`
stage: imgclf.tracking.registration.)

A tracking server that does not answer leaves models/mlflow_pending.json; `imgclf relog` (or
the next `dvc repro`, which finds it) sends the rest, with nothing lost and nothing twice.
"""

from __future__ import annotations

import json

from imgclf import io, paths
from imgclf.errors import ServiceLost, UserError
from imgclf.params import Params, load_params
from imgclf.tracking import store
from imgclf.tracking.runs import EpochLog, first_line
from imgclf.tracking.store import TRACKING_ERRORS


def _log_outputs(client, run_id: str, timings: dict, calibration: dict) -> None:
    for path in (paths.TRAIN_HISTORY, paths.CLASSES_JSON, paths.TRAIN_METRICS):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    for key, value in timings.items():
        client.log_metric(run_id, key, value)
    for key, value in calibration.items():
        client.log_metric(run_id, f"calibration_{key}", value)


def publish(client, pending: dict) -> dict:
    """Send MLflow what a finished training has on disk (`pending`), then write
    reports/train.json. A server that does not answer leaves models/mlflow_pending.json."""
    run_id = pending["run_id"]
    try:
        if pending["first_unsent_epoch"] is not None:
            EpochLog(client, run_id).send([r for r in pending["history"]
                                           if r["epoch"] >= pending["first_unsent_epoch"]])
            pending = {**pending, "first_unsent_epoch": None}
        _log_outputs(client, run_id, pending["timings"],
                     pending["outputs"].get("calibration") or {})
        client.set_terminated(run_id, status="FINISHED")
    except TRACKING_ERRORS as err:
        io.write_json(paths.MLFLOW_PENDING, pending)
        raise ServiceLost(
            f"MLflow tracking server {store.tracking_uri()} was lost ({first_line(err)}). "
            f"Training finished and nothing is lost: the model is in {paths.MODEL_FILE}, "
            f"metrics and history in {paths.TRAIN_METRICS} and {paths.TRAIN_HISTORY}, and what "
            f"MLflow run {run_id} still needs in {paths.MLFLOW_PENDING}. When the server is "
            "back, run `imgclf relog` (or `dvc repro`, which relogs instead of retraining)"
        ) from None
    report = {"run_id": run_id, **pending["outputs"]}
    io.write_json(paths.TRAIN_REPORT, report)
    paths.MLFLOW_PENDING.unlink(missing_ok=True)
    return report


def read_pending(params: Params) -> dict | None:
    """The pending MLflow logging of a finished training with these params and data."""
    from imgclf.training import resume

    if not paths.MLFLOW_PENDING.is_file() or not paths.MODEL_FILE.is_file():
        return None
    pending = json.loads(paths.MLFLOW_PENDING.read_text(encoding="utf-8"))
    if pending.get("fingerprint") != resume.fingerprint(params.flat(), store.data_version()):
        return None
    return pending


def relog() -> dict:
    """`imgclf relog`: send the MLflow run what a training kept on disk while its tracking
    server was lost (models/mlflow_pending.json), with nothing lost and nothing sent twice."""
    params = load_params()
    if not paths.MLFLOW_PENDING.is_file():
        raise UserError(f"nothing to relog: {paths.MLFLOW_PENDING} does not exist (every "
                        "finished training here has reached MLflow)")
    pending = read_pending(params)
    if pending is None:
        raise UserError(f"{paths.MLFLOW_PENDING} belongs to another training than params.yaml, "
                        f"data/prepared and {paths.MODEL_FILE} now hold; restore them (git "
                        "checkout, dvc checkout) and run `imgclf relog` again")
    store.check_reachable()
    report = publish(store.make_client(), pending)
    print(f"relog: MLflow run {report['run_id']} complete. If the train stage ended with "
          "this error under DVC, `dvc commit train` records it as done; `dvc repro` then "
          "registers the model.")
    return report
