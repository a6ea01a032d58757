"""DVC stage `evaluate`: honest numbers on the held-out test split, and pictures of them.

Reads params sections evaluate, model (image_size, resize). The test split is used here only:
never for early stopping or model choice. Writes reports/metrics.json (DVC metrics),
reports/per_class.csv, reports/confused_pairs.csv, reports/plots/confusion.csv (DVC confusion
plot) and reports/figures/*.png; logs them to the training run in MLflow and tags the
registered model version with the test metrics.
"""

from __future__ import annotations

import json

import numpy as np

from stages import atomic, paths
from stages.errors import UserError, exits_cleanly
from stages.params import Params, load_params

WRONG_SHOWN = 24


def evaluate(params: Params, model, files: list[str], labels: np.ndarray, classes: list[str]):
    """(metrics, per-class table, confusion matrix, pairs, probs) for the test split."""
    from stages import metrics as m
    from stages.predicting import predict_files

    probs, good, bad = predict_files(model, files, params.evaluate.batch_size)
    if bad:
        raise UserError(f"{len(bad)} test image(s) could not be read (e.g. {files[bad[0][0]]}: "
                        f"{bad[0][1]}): rerun the prepare stage")
    # Rounded once, so metrics.json, MLflow and the registry tags show the same numbers.
    summary = {k: round(v, 6) if isinstance(v, float) else v
               for k, v in m.summary_metrics(probs, labels).items()}
    matrix = m.confusion(probs, labels, len(classes))
    return (summary, m.per_class_table(probs, labels, classes), matrix,
            m.confused_pairs(matrix, classes), probs)


def write_reports(summary, per_class, matrix, pairs, probs, files, labels, classes,
                  image_size: int, resize: str) -> list:
    import pandas as pd

    from stages import metrics as m
    from stages import plots
    from stages.images import load_pixels

    atomic.write_json(paths.METRICS, summary)
    atomic.write_csv(paths.PER_CLASS, per_class)
    atomic.write_csv(paths.CONFUSED_PAIRS, pairs)
    predicted = probs.argmax(axis=1)
    atomic.write_csv(paths.CONFUSION_CSV, pd.DataFrame(
        {"actual": [classes[i] for i in labels], "predicted": [classes[i] for i in predicted]}))
    wrong = m.confidently_wrong(probs, labels, WRONG_SHOWN)
    figures = {
        "confusion_matrix.png": plots.confusion_matrix_png(matrix, classes),
        "per_class_f1.png": plots.per_class_f1_png(classes, per_class["f1"].tolist()),
        "misclassified.png": plots.image_grid(
            [load_pixels(files[i], image_size, resize) for i in wrong],
            [f"true {classes[labels[i]]}\npred {classes[predicted[i]]} "
             f"({probs[i, predicted[i]]:.0%})" for i in wrong],
            "Most confidently wrong test images"),
    }
    for name, png in figures.items():
        atomic.write_bytes(paths.EVAL_FIGURES / name, png)
    return [paths.METRICS, paths.PER_CLASS, paths.CONFUSED_PAIRS, paths.CONFUSION_CSV,
            *[paths.EVAL_FIGURES / name for name in figures]]


def log_to_mlflow(client, train_report: dict, summary: dict, artifacts: list) -> None:
    """Test metrics as `test_*` on the training run and as tags on its model version."""
    run_id = train_report["run_id"]
    for key, value in summary.items():
        client.log_metric(run_id, f"test_{key}", float(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    name, version = train_report.get("registered_model"), train_report.get("model_version")
    if name and version:
        for key, value in summary.items():
            client.set_model_version_tag(name, str(version), f"test_{key}", str(value))


@exits_cleanly
def main() -> None:
    params = load_params()
    if not paths.TRAIN_REPORT.is_file() or not paths.MODEL_FILE.is_file():
        raise UserError("no trained model: run the train stage first (dvc repro train)")
    from stages import tracking
    from stages.inputs import read_classes, read_manifest
    from stages.predicting import load_keras_file

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    model = load_keras_file(paths.MODEL_FILE, paths.CLASSES_JSON, params.model.image_size,
                            params.model.resize, tta=params.evaluate.tta)
    summary, per_class, matrix, pairs, probs = evaluate(params, model, files, labels, classes)
    artifacts = write_reports(summary, per_class, matrix, pairs, probs, files, labels, classes,
                              params.model.image_size, params.model.resize)
    train_report = json.loads(paths.TRAIN_REPORT.read_text(encoding="utf-8"))
    log_to_mlflow(tracking.make_client(), train_report, summary, artifacts)
    print(f"evaluate: test accuracy {summary['accuracy']:.4f}, top-5 "
          f"{summary['top5_accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, "
          f"log loss {summary['log_loss']:.4f} on {summary['n_test']} images"
          f"{' (TTA)' if params.evaluate.tta else ''}")
    if len(pairs):
        top = pairs.iloc[0]
        print(f"  most confused: {top['actual']} -> {top['predicted']} ({top['count']}x)")


if __name__ == "__main__":
    main()
