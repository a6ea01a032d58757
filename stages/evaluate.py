"""DVC stage `evaluate`: honest numbers on the held-out test split, of the model in production.

Reads params sections evaluate, model (image_size, resize). The test split is used here only:
never for early stopping or model choice. The registered version that `train` made is loaded
as `mlflow models serve` loads it, and each test file goes through it as a client sends it
(base64 bytes): the test metrics are those of what serves. The Keras model's own numbers and
its agreement with the served format are reported beside them. Writes reports/metrics.json
(DVC metrics), reports/per_class.csv, reports/confused_pairs.csv, reports/plots/confusion.csv
(DVC confusion plot) and reports/figures/*.png; logs them to the training run in MLflow and
tags the registered version with the test metrics (what the promotion gate compares).
"""

from __future__ import annotations

import json

from imgclf import paths
from imgclf.errors import UserError, exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    if not paths.TRAIN_REPORT.is_file() or not paths.MODEL_FILE.is_file():
        raise UserError("no trained model: run the train stage first (dvc repro train)")
    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.reports import served_and_keras, test_results, write_evaluation
    from imgclf.tracking import registry, runs, store

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    train_report = json.loads(paths.TRAIN_REPORT.read_text(encoding="utf-8"))
    uri = registry.version_uri(train_report["registered_model"], train_report["model_version"])
    with registry.served_model(uri) as served:
        probs, keras_summary, fmt = served_and_keras(served, files, labels, classes, params)
    summary, per_class, matrix, pairs = test_results(probs, labels, classes)
    artifacts = write_evaluation({**summary, **keras_summary}, per_class, matrix, pairs, probs,
                                 files, labels, classes, params.model.image_size,
                                 params.model.resize)
    runs.log_evaluation(store.make_client(), train_report, summary, keras_summary, fmt,
                        artifacts)
    print(f"evaluate: {uri} served as {fmt}: test accuracy {summary['accuracy']:.4f}, top-5 "
          f"{summary['top5_accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, "
          f"log loss {summary['log_loss']:.4f} on {summary['n_test']} images"
          f"{' (TTA)' if params.evaluate.tta else ''}")
    if keras_summary:
        print(f"  the Keras model: accuracy {keras_summary['keras_accuracy']:.4f}, log loss "
              f"{keras_summary['keras_log_loss']:.4f}; top-1 agreement with the served "
              f"format {keras_summary['served_keras_top1_agreement']:.4f}")
    if len(pairs):
        top = pairs.iloc[0]
        print(f"  most confused: {top['actual']} -> {top['predicted']} ({top['count']}x)")


if __name__ == "__main__":
    main()
