"""The training run in MLflow: opened (or resumed, or adopted from `mlflow run`), fed epoch by
epoch, and given the evaluate and export stages' results afterwards.

Every stage logs into the one run that `train` opened; `reports/train.json` names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from imgclf.metrics import epoch_metrics
from imgclf.params import Params
from imgclf.stage_reports import RegisterReport
from imgclf.tracking import store
from imgclf.tracking.store import TRACKING_ERRORS

# Set by `mlflow run` for its entry point: the run it opened, which the training adopts.
MLFLOW_RUN_ID = "MLFLOW_RUN_ID"


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _log_params(client, run_id: str, params: Params) -> None:
    flat = params.flat()
    items = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in flat.items()]
    for start in range(0, len(items), 100):  # the REST API's batch limit for params
        client.log_batch(run_id, params=items[start:start + 100])


def start_or_resume(client, params: Params, saved_run_id: str | None) -> tuple[str, bool]:
    """(run_id, resumed). A resumed training continues in its own MLflow run; under
    `mlflow run` a new training logs into the run it opened (MLFLOW_RUN_ID)."""
    if saved_run_id:
        _check_resumable(client, saved_run_id)
        client.update_run(saved_run_id, status="RUNNING")
        return saved_run_id, True
    commit, dirty = store.git_state()
    adopted = os.environ.get(MLFLOW_RUN_ID)
    if adopted:
        try:
            client.get_run(adopted)
        except MlflowException:
            adopted = None
    if adopted:
        run_id = adopted
        for key, value in store.run_tags(commit, dirty).items():
            client.set_tag(run_id, key, value)
    else:
        experiment_id = store.ensure_experiment(client, params.mlflow.experiment)
        run_id = client.create_run(experiment_id, run_name=store.run_name(commit),
                                   tags=store.run_tags(commit, dirty)).info.run_id
    _log_params(client, run_id, params)
    log_datasets(client, run_id)
    return run_id, False


# MLflow's dataset contexts, by split: the runs table's "Dataset" column shows them.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_datasets(client, run_id: str) -> None:
    """The three manifests as MLflow datasets. Their digest is the run's `data_version` tag,
    so runs trained on the same prepared data show the same datasets in the UI."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from imgclf import paths

    version = store.data_version()
    inputs = []
    for split, context in DATASET_CONTEXTS.items():
        manifest = paths.manifest(split)
        frame = pd.read_csv(manifest, dtype={"label": str}, keep_default_na=False)
        with warnings.catch_warnings():
            # MLflow's notes on resolving a local path and on integer columns (width,
            # height) concern it, not the user.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=str(manifest.resolve()),
                                              targets="label", name=split, digest=version)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                       tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)


def _check_resumable(client, run_id: str) -> None:
    """A resume continues its own run; one deleted since stops the stage and says how to go
    on, rather than a new run quietly holding half a history."""
    from imgclf import paths
    from imgclf.errors import UserError

    fresh = (f"or set train.resume=false (or delete {paths.RESUME_DIR}) to train from scratch "
             "in a new run")
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"the interrupted training in {paths.RESUME_DIR} logs to MLflow run "
                        f"{run_id}, which {store.tracking_uri()} does not have (deleted for "
                        f"good, or another tracking store): point MLFLOW_TRACKING_URI at its "
                        f"store, {fresh}") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"the interrupted training in {paths.RESUME_DIR} logs to MLflow run "
                        f"{run_id}, which was deleted: restore it (`mlflow runs restore "
                        f"--run-id {run_id}`) to resume there, {fresh}")


def mark_killed(client, run_id: str) -> None:
    """The run ends as KILLED when training dies; a lost server must not hide the first error."""
    with contextlib.suppress(*TRACKING_ERRORS):
        client.set_terminated(run_id, status="KILLED")


class EpochLog:
    """Per-epoch metrics to the MLflow run. A tracking server lost mid-run stops the logging,
    never the training: the epochs not sent stay in the history for `publish` to send."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.first_unsent: int | None = None

    def __call__(self, row: dict, tracker=None) -> None:
        if self.first_unsent is not None:
            return
        try:
            self.send([row])
        except TRACKING_ERRORS as err:
            self.first_unsent = row["epoch"]
            print(f"warning: MLflow tracking server lost at epoch {row['epoch']} "
                  f"({first_line(err)}); training goes on and keeps everything on disk",
                  file=sys.stderr)

    def send_missing(self, history: list[dict]) -> None:
        """On resume: the epochs the resume state holds that the run does not (the process
        died between saving an epoch and logging it). Epochs already there are not sent
        again, so every epoch is in the run once."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        missing = [row for row in history if row["epoch"] not in logged]
        if missing:
            self.send(missing)

    def send(self, rows: list[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, r["epoch"]) for r in rows
                   for k, v in epoch_metrics(r).items()]
        for start in range(0, len(metrics), 1000):  # the REST API's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])


class TrainingRun:
    """The training's MLflow run as the training session records it (a
    `training.session.RunLog` by its methods: tracking does not import training). Opened or
    resumed, fed epoch by epoch, ended KILLED when training dies; once the model is saved,
    what the run still has to receive goes to models/mlflow_pending.json for `publish`."""

    def __init__(self, client, params: Params, fingerprint: str):
        self.client, self.params, self.fingerprint = client, params, fingerprint
        self.run_id: str | None = None
        self.epochs: EpochLog | None = None
        self.pending = None  # what `finished` wrote, for `publish`

    @property
    def label(self) -> str:
        return f"MLflow run {self.run_id}"

    def start(self, saved_run_id: str | None) -> bool:
        self.run_id, resumed = start_or_resume(self.client, self.params, saved_run_id)
        self.epochs = EpochLog(self.client, self.run_id)
        return resumed

    def send_missing(self, history: list[dict]) -> None:
        self.epochs.send_missing(history)

    def epoch(self, row: dict) -> None:
        self.epochs(row)

    def killed(self) -> None:
        mark_killed(self.client, self.run_id)

    def finished(self, history: list[dict], timings: dict, outputs: dict) -> None:
        from imgclf.tracking.publish import Pending

        # On disk before the first call that could fail: a server lost now (or a kill) costs
        # a `relog`, never the training.
        self.pending = Pending(run_id=self.run_id, fingerprint=self.fingerprint,
                               first_unsent_epoch=self.epochs.first_unsent, history=history,
                               timings=timings, outputs=outputs)
        self.pending.write()


def log_evaluation(client, registered: RegisterReport, summary: dict, keras_summary: dict,
                   served_format: str, artifacts: list[Path], card: str,
                   pictures: list[Path] = ()) -> None:
    """Test metrics of the served model as `test_*` on the training run and as tags on its
    model version (the promotion gate reads those); the Keras model's numbers beside them;
    the model card, now with its test section, as the version's description."""
    run_id = registered.run_id
    for key, value in {**summary, **keras_summary}.items():
        client.log_metric(run_id, f"test_{key}", float(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    for path in pictures:  # the training curves and augmentation preview, at the run's root
        client.log_artifact(run_id, str(path))
    name, version = registered.registered_model, str(registered.model_version)
    for key, value in summary.items():
        client.set_model_version_tag(name, version, f"test_{key}", str(value))
    client.set_model_version_tag(name, version, "test_served_format", served_format)
    client.update_model_version(name, version, description=card)


def log_export(client, run_id: str, report_path: Path, formats: dict[str, dict]) -> None:
    """The export report and each format's figures, on the training run."""
    client.log_artifact(run_id, str(report_path), artifact_path="export")
    for name, fmt in formats.items():
        for key in ("images_per_s", "latency_ms_batch1", "size_mb", "top1_agreement"):
            if fmt.get(key) is not None:  # timings only with export.measure; no agreement
                # for a copy package did not check
                client.log_metric(run_id, f"export_{name}_{key}", float(fmt[key]))


def log_to_entry_run(tags: dict[str, str], artifacts: list[Path] = ()) -> str | None:
    """Under `mlflow run` (MLFLOW_RUN_ID set), what a CLI entry point did goes into the run it
    opened, so that run is not left empty; elsewhere nothing. Returns the run id used."""
    run_id = os.environ.get(MLFLOW_RUN_ID)
    if not run_id:
        return None
    client = store.make_client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return run_id
