"""DVC stage `train`: two-phase fine-tuning, tracked in MLflow (the `register` stage logs and
registers the model it writes).

Reads params sections model, augment (the augmentation keys), features (cache, views), train,
mlflow.experiment.
Writes models/model.keras, reports/train.json, reports/train_metrics.json,
reports/plots/train_history.csv (evaluate draws its curves). An interrupted run resumes
from its last completed epoch (models/checkpoints/last/) into the same MLflow run.
"""

from __future__ import annotations

from imgclf import paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    from imgclf.model.network import resolve_weights
    from imgclf.training.distribute import make_strategy

    # First TensorFlow work of the process: a multi-worker strategy must come before any.
    strategy, role = make_strategy(params.train.strategy)
    weights = resolve_weights(params.model.weights)  # offline imagenet fails here, in seconds
    from imgclf.data.manifests import data_version
    from imgclf.tracking import store
    from imgclf.tracking.publish import publish, read_pending
    from imgclf.tracking.runs import TrainingRun
    from imgclf.training.resume import fingerprint
    from imgclf.training.session import NoRunLog, train

    if not role.is_chief:  # only the chief records the run and writes the stage's outputs
        train(params, weights, NoRunLog(), strategy, role)
        return
    client, fp = store.usable_client(params.mlflow.experiment), fingerprint(params.flat(),
                                                                            data_version())
    pending = read_pending(fp)
    if pending is not None:
        # This exact training already finished; only MLflow missed it (server lost).
        print(f"train: {paths.MODEL_FILE} is already trained for these params and data; "
              "sending MLflow what it missed instead of retraining")
    else:
        run = TrainingRun(client, params, fp)
        train(params, weights, run, strategy, role)
        pending = run.pending
    report = publish(client, pending)
    print(f"train: best epoch {report.best_epoch} ({report.monitor} "
          f"{report.best_value:.4f}); model {paths.MODEL_FILE}; MLflow run {report.run_id}")


if __name__ == "__main__":
    main()
