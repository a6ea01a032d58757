"""The evaluate stage's reports: test-split numbers, tables and pictures, written atomically."""

from __future__ import annotations

import numpy as np

from imgclf import io, paths

WRONG_SHOWN = 24  # images in the confidently-wrong grid


def served_and_keras(served, files: list[str], labels: np.ndarray, classes: list[str],
                     params) -> tuple[np.ndarray, dict, str]:
    """(the served model's test probabilities, the Keras model's numbers beside them, the
    served format). Keras is run only where the served format is not Keras itself."""
    from tqdm import tqdm

    from imgclf import metrics as m
    from imgclf.errors import UserError
    from imgclf.serving.batches import predict_files, predict_served

    inner = served.unwrap_python_model()
    tta, batch = params.evaluate.tta, params.evaluate.batch_size
    with tqdm(total=len(files), unit="img", desc="evaluate") as bar:
        probs, _, bad = predict_served(served, files, len(classes), batch, tta, bar.update)
    if bad:
        raise UserError(f"{len(bad)} test image(s) could not be read (e.g. {files[bad[0][0]]}: "
                        f"{bad[0][1]}): rerun the prepare stage")
    if inner.format == "keras":
        return probs, {}, inner.format
    keras_probs, _, _ = predict_files(inner.keras_runner("keras", tta), files, batch)
    keras_numbers = m.summary_metrics(keras_probs, labels)
    return probs, {
        "keras_accuracy": round(keras_numbers["accuracy"], 6),
        "keras_log_loss": round(keras_numbers["log_loss"], 6),
        "served_keras_top1_agreement": m.parity(keras_probs, probs)["top1_agreement"],
    }, inner.format


def test_results(probs: np.ndarray, labels: np.ndarray, classes: list[str]):
    """(summary, per-class table, confusion matrix, most confused pairs) of test predictions."""
    from imgclf import metrics as m

    # Rounded once, so metrics.json, MLflow and the registry tags show the same numbers.
    summary = {k: round(v, 6) if isinstance(v, float) else v
               for k, v in m.summary_metrics(probs, labels).items()}
    matrix = m.confusion(probs, labels, len(classes))
    return (summary, m.per_class_table(probs, labels, classes), matrix,
            m.confused_pairs(matrix, classes))


def write_evaluation(summary, per_class, matrix, pairs, probs, files, labels, classes,
                     image_size: int, resize: str) -> list:
    """Every evaluate output; returns their paths (for MLflow)."""
    import pandas as pd

    from imgclf import metrics as m
    from imgclf import plots
    from imgclf.data.images import load_pixels

    io.write_json(paths.METRICS, summary)
    io.write_csv(paths.PER_CLASS, per_class)
    io.write_csv(paths.CONFUSED_PAIRS, pairs)
    predicted = probs.argmax(axis=1)
    io.write_csv(paths.CONFUSION_CSV, pd.DataFrame(
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
        io.write_bytes(paths.EVAL_FIGURES / name, png)
    return [paths.METRICS, paths.PER_CLASS, paths.CONFUSED_PAIRS, paths.CONFUSION_CSV,
            *[paths.EVAL_FIGURES / name for name in figures]]
