"""The evaluate stage's reports: test-split numbers, tables and pictures, written atomically."""

from __future__ import annotations

import numpy as np

from imgclf import io, paths

WRONG_SHOWN = 24  # images in the confidently-wrong grid


def _short(path: str, width: int = 28) -> str:
    """A file name that fits under a thumbnail: the name, cut in the middle if long."""
    name = path.rsplit("/", 1)[-1]
    return name if len(name) <= width else f"{name[:12]}...{name[-(width - 15):]}"


def served_and_keras(served, files: list[str], labels: np.ndarray, classes: list[str],
                     params, stored_keras: np.ndarray) -> tuple[np.ndarray, dict, str]:
    """(the served model's test probabilities, the Keras model's numbers beside them, the
    served format). The Keras model's are `stored_keras` (package ran it over the test
    split); with evaluate.tta they are computed here, over each image and its mirror."""
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
    keras_probs = (predict_files(inner.keras_runner("keras", tta), files, batch)[0] if tta
                   else stored_keras)
    keras_numbers = m.summary_metrics(keras_probs, labels)
    return probs, {
        "keras_accuracy": round(keras_numbers["accuracy"], 6),
        "keras_log_loss": round(keras_numbers["log_loss"], 6),
        "served_keras_top1_agreement": m.parity(keras_probs, probs)["top1_agreement"],
    }, inner.format


def calibration(probs: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[dict, bytes]:
    """ECE and log loss of the (calibrated) test probabilities and of the same model without
    its temperature, and the reliability diagram of both."""
    from imgclf import metrics as m
    from imgclf import plots

    # The model divides its logits by T; multiplying log p by T undoes it exactly.
    before = m.with_temperature(probs, 1.0 / temperature)
    ece, ece_before = (m.expected_calibration_error(p, labels) for p in (probs, before))
    numbers = {"temperature": round(temperature, 6), "ece": round(ece, 6),
               "ece_uncalibrated": round(ece_before, 6),
               "log_loss_uncalibrated": round(m.summary_metrics(before, labels)["log_loss"], 6)}
    png = plots.reliability_diagram(m.reliability(before, labels), m.reliability(probs, labels),
                                    ece_before, ece, temperature)
    return numbers, png


def test_results(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                 temperature: float = 1.0):
    """(summary, per-class table, confusion matrix, most confused pairs, reliability diagram)
    of test predictions."""
    from imgclf import metrics as m

    # Rounded once, so metrics.json, MLflow and the registry tags show the same numbers.
    summary = {k: round(v, 6) if isinstance(v, float) else v
               for k, v in m.summary_metrics(probs, labels).items()}
    calibrated, reliability_png = calibration(probs, labels, temperature)
    summary.update(calibrated)
    matrix = m.confusion(probs, labels, len(classes))
    return (summary, m.per_class_table(probs, labels, classes), matrix,
            m.confused_pairs(matrix, classes), reliability_png)


def write_evaluation(summary, per_class, matrix, pairs, reliability_png, probs, files, labels,
                     classes, image_size: int, resize: str) -> list:
    """Every evaluate output; returns their paths (for MLflow)."""
    import pandas as pd

    from imgclf import metrics as m
    from imgclf import plots
    from imgclf.data.images import load_pixels

    io.write_json(paths.METRICS, summary)
    io.write_csv(paths.PER_CLASS, per_class)
    io.write_csv(paths.CONFUSED_PAIRS, pairs)
    io.write_csv(paths.ERRORS_CSV, m.errors_table(probs, labels, files, classes))
    predicted = probs.argmax(axis=1)
    io.write_csv(paths.CONFUSION_CSV, pd.DataFrame(
        {"actual": [classes[i] for i in labels], "predicted": [classes[i] for i in predicted]}))
    wrong = m.confidently_wrong(probs, labels, WRONG_SHOWN)
    figures = {
        "confusion_matrix.png": plots.confusion_matrix_png(matrix, classes),
        "per_class_f1.png": plots.per_class_f1_png(classes, per_class["f1"].tolist()),
        "misclassified.png": plots.image_grid(
            [load_pixels(files[i], image_size, resize) for i in wrong],
            [f"{_short(files[i])}\ntrue {classes[labels[i]]}\npred {classes[predicted[i]]} "
             f"({probs[i, predicted[i]]:.0%})" for i in wrong],
            f"Most confidently wrong test images (all of them, worst first: {paths.ERRORS_CSV})"),
        "reliability.png": reliability_png,
    }
    for name, png in figures.items():
        io.write_bytes(paths.EVAL_FIGURES / name, png)
    return [paths.METRICS, paths.PER_CLASS, paths.CONFUSED_PAIRS, paths.ERRORS_CSV,
            paths.CONFUSION_CSV,
            *[paths.EVAL_FIGURES / name for name in figures]]


def training_pictures() -> list:
    """The training curves, drawn from the history train wrote, and the augmentation preview:
    pictures of the training run, made here so that restyling them never retrains."""
    import pandas as pd

    from imgclf import plots

    history = pd.read_csv(paths.TRAIN_HISTORY).to_dict("records")
    io.write_bytes(paths.TRAIN_CURVES, plots.training_curves(history))
    return [p for p in (paths.TRAIN_CURVES, paths.AUGMENT_PREVIEW) if p.is_file()]


def evaluation_lines(uri: str, fmt: str, summary: dict, keras_summary: dict, pairs,
                     tta: bool) -> str:
    """What evaluate prints: the served numbers, calibration, the Keras model beside them."""
    lines = [f"evaluate: {uri} served as {fmt}: test accuracy {summary['accuracy']:.4f}, top-5 "
             f"{summary['top5_accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, log loss "
             f"{summary['log_loss']:.4f} on {summary['n_test']} images{' (TTA)' if tta else ''}",
             f"  calibration: temperature {summary['temperature']:.3f}; expected calibration "
             f"error {summary['ece_uncalibrated']:.4f} -> {summary['ece']:.4f}, log loss "
             f"{summary['log_loss_uncalibrated']:.4f} -> {summary['log_loss']:.4f}"]
    if keras_summary:
        lines.append(f"  the Keras model: accuracy {keras_summary['keras_accuracy']:.4f}, log "
                     f"loss {keras_summary['keras_log_loss']:.4f}; top-1 agreement with the "
                     f"served format {keras_summary['served_keras_top1_agreement']:.4f}")
    if len(pairs):
        top = pairs.iloc[0]
        lines.append(f"  most confused: {top['actual']} -> {top['predicted']} "
                     f"({top['count']}x); every misclassified file: {paths.ERRORS_CSV}")
    return "\n".join(lines)
