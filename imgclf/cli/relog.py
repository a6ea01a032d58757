"""`imgclf relog`: send the MLflow run what a training kept on disk while its tracking
server was lost (models/mlflow_pending.json), with nothing lost and nothing sent twice."""

from __future__ import annotations

from imgclf import paths
from imgclf.data.manifests import data_version
from imgclf.errors import UserError
from imgclf.params import load_params
from imgclf.stage_reports import TrainReport
from imgclf.tracking import store
from imgclf.tracking.publish import publish, read_pending
from imgclf.training.resume import fingerprint


def main() -> TrainReport:
    params = load_params()
    if not paths.MLFLOW_PENDING.is_file():
        raise UserError(f"nothing to relog: {paths.MLFLOW_PENDING} does not exist (every "
                        "finished training here has reached MLflow)")
    pending = read_pending(fingerprint(params.flat(), data_version()))
    if pending is None:
        raise UserError(f"{paths.MLFLOW_PENDING} belongs to another training than params.yaml, "
                        f"data/prepared and {paths.MODEL_FILE} now hold; restore them (git "
                        "checkout, dvc checkout) and run `imgclf relog` again")
    store.check_reachable()
    report = publish(store.make_client(), pending)
    print(f"relog: MLflow run {report.run_id} complete. If the train stage ended with "
          "this error under DVC, `dvc commit train` records it as done; `dvc repro` then "
          "registers the model.")
    return report
