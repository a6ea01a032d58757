"""What a finished training sends MLflow: the epochs it missed, its artifacts, timings and
calibration; then the run is FINISHED and reports/train.json names it. (The `register` stage
logs and registers the model: imgclf.tracking.registration.)

A tracking server that does not answer leaves models/mlflow_pending.json; `imgclf relog` (or
the next `dvc repro`, which finds it) sends the rest, with nothing lost and nothing twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from imgclf import paths
from imgclf.errors import ServiceLost
from imgclf.stage_reports import StageReport, TrainReport
from imgclf.tracking import store
from imgclf.tracking.runs import EpochLog, first_line
from imgclf.tracking.store import TRACKING_ERRORS


@dataclasses.dataclass(frozen=True)
class Pending(StageReport):
    """models/mlflow_pending.json: everything a finished training's run has yet to receive."""

    PATH: ClassVar[Path] = paths.MLFLOW_PENDING
    STAGE: ClassVar[str] = "train"

    run_id: str
    fingerprint: str              # training.resume.fingerprint of the params and data
    first_unsent_epoch: int | None
    history: list[dict]
    timings: dict
    outputs: dict                 # reports/train.json without the run id


def _log_outputs(client, run_id: str, timings: dict, calibration: dict) -> None:
    for path in (paths.TRAIN_HISTORY, paths.CLASSES_JSON, paths.TRAIN_METRICS):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    for key, value in timings.items():
        client.log_metric(run_id, key, value)
    for key, value in calibration.items():
        client.log_metric(run_id, f"calibration_{key}", value)


def publish(client, pending: Pending) -> TrainReport:
    """Send MLflow what a finished training has on disk (`pending`), then write
    reports/train.json. A server that does not answer leaves models/mlflow_pending.json."""
    run_id = pending.run_id
    try:
        if pending.first_unsent_epoch is not None:
            EpochLog(client, run_id).send([r for r in pending.history
                                           if r["epoch"] >= pending.first_unsent_epoch])
            pending = dataclasses.replace(pending, first_unsent_epoch=None)
        _log_outputs(client, run_id, pending.timings, pending.outputs.get("calibration") or {})
        client.set_terminated(run_id, status="FINISHED")
    except TRACKING_ERRORS as err:
        pending.write()
        raise ServiceLost(
            f"MLflow tracking server {store.tracking_uri()} was lost ({first_line(err)}). "
            f"Training finished and nothing is lost: the model is in {paths.MODEL_FILE}, "
            f"metrics and history in {paths.TRAIN_METRICS} and {paths.TRAIN_HISTORY}, and what "
            f"MLflow run {run_id} still needs in {paths.MLFLOW_PENDING}. When the server is "
            "back, run `imgclf relog` (or `dvc repro`, which relogs instead of retraining)"
        ) from None
    report = TrainReport(run_id=run_id, **pending.outputs)
    report.write()
    paths.MLFLOW_PENDING.unlink(missing_ok=True)
    return report


def read_pending(fingerprint: str) -> Pending | None:
    """The pending MLflow logging of a finished training of this `fingerprint` (params and
    data), or None."""
    if not paths.MLFLOW_PENDING.is_file() or not paths.MODEL_FILE.is_file():
        return None
    pending = Pending.read()
    return pending if pending.fingerprint == fingerprint else None
