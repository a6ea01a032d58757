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
                     params, stored_keras: np.ndarray):
    """(the served model's answers on the test files, the Keras model's numbers beside
    them, the served format). The Keras model's are `stored_keras` (package ran it over the
    test split); with evaluate.tta they are computed here, over each image and its mirror."""
    from tqdm import tqdm

    from imgclf import metrics as m
    from imgclf.errors import UserError
    from imgclf.serving.batches import predict_files, predict_served

    inner = served.unwrap_python_model()
    tta, batch = params.evaluate.tta, params.evaluate.batch_size
    with tqdm(total=len(files), unit="img", desc="evaluate") as bar:
        answers = predict_served(served, files, len(classes), batch, tta, bar.update,
                                 scores=True)
    probs, bad = answers.probs, answers.bad
    if bad:
        raise UserError(f"{len(bad)} test image(s) could not be read (e.g. {files[bad[0][0]]}: "
                        f"{bad[0][1]}): rerun the prepare stage")
    if inner.format == "keras":
        return answers, {}, inner.format
    keras_probs = (predict_files(inner.keras_runner("keras", tta), files, batch)[0] if tta
                   else stored_keras)
    keras_numbers = m.summary_metrics(keras_probs, labels)
    return answers, {
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


def served_ood(served, folder: str, num_classes: int, batch_size: int):
    """The served model's answers on a folder of images of none of the classes."""
    from pathlib import Path

    from tqdm import tqdm

    from imgclf.errors import UserError
    from imgclf.serving.batches import collect_images, predict_served

    if not Path(folder).is_dir():
        raise UserError(f"evaluate.ood_dir = {folder!r} is not a folder: give a folder of "
                        "images of none of the classes, or null")
    files, _ = collect_images([folder])
    if not files:
        raise UserError(f"evaluate.ood_dir = {folder!r} holds no image files")
    with tqdm(total=len(files), unit="img", desc="evaluate ood") as bar:
        answers = predict_served(served, files, num_classes, batch_size, on_batch=bar.update,
                                 scores=True)
    if not answers.good:
        raise UserError(f"evaluate.ood_dir = {folder!r}: none of its files could be read")
    return answers


def selective_results(test, labels: np.ndarray, selective, keras_probs: np.ndarray,
                      keras_features: np.ndarray, ood=None):
    """What the status per image does on the test split (and on the images of none of the
    classes, `ood`): (numbers for metrics.json, every method's table, the risk-coverage
    curve, the figures by name). `test` and `ood`: the served model's answers
    (serving.batches.ServedAnswers); the Keras arrays: package's, for the status agreement."""
    import pandas as pd

    from imgclf import metrics as m
    from imgclf import plots
    from imgclf.model import selective as sel

    status = np.asarray(test.status, dtype=object)
    confidence = test.probs.max(axis=1)
    correct = test.probs.argmax(axis=1) == labels
    ok = status == sel.OK
    keras_status, _ = selective.status(keras_probs, keras_features)
    curve = sel.risk_coverage(confidence, correct)
    area = sel.aurc(confidence, correct)
    numbers = {
        "coverage": round(float(ok.mean()), 6),
        "accuracy_answered": round(float(correct[ok].mean()), 6) if ok.any() else 1.0,
        "unsure_share": round(float((status == sel.UNSURE).mean()), 6),
        "unknown_share": round(float((status == sel.UNKNOWN).mean()), 6),
        "aurc": round(area, 6),
        "served_keras_status_agreement": round(float((keras_status == status).mean()), 6),
    }
    rows = []
    for method in sel.METHODS:
        threshold = selective.thresholds[method]
        row = {"method": method, "served": method == selective.method,
               "threshold": threshold,
               "test_unknown_share": float((test.scores[method] > threshold).mean())}
        if ood is not None:
            row.update(m.ood_separation(test.scores[method], ood.scores[method]))
            row["ood_unknown_share"] = float((ood.scores[method] > threshold).mean())
        rows.append(row)
    methods = pd.DataFrame(rows)
    ood_scores = None
    if ood is not None:
        ood_status = np.asarray(ood.status, dtype=object)
        ood_scores = ood.ood_score
        separation = m.ood_separation(test.ood_score, ood_scores)
        numbers.update({
            "ood_images": len(ood.good),
            "ood_auroc": round(separation["auroc"], 6),
            "ood_fpr_at_95_tpr": round(separation["fpr_at_95_tpr"], 6),
            "ood_flagged_unknown": round(float((ood_status == sel.UNKNOWN).mean()), 6),
            "ood_flagged": round(float((ood_status != sel.OK).mean()), 6),
        })
    served_point = ((numbers["coverage"], numbers["accuracy_answered"])
                    if selective.confidence_threshold is not None
                    or selective.ood_threshold is not None else None)
    threshold = selective.ood_threshold if selective.ood_threshold is not None else np.inf
    figures = {"risk_coverage.png": plots.risk_coverage_png(curve, served_point, area),
               "ood_scores.png": plots.score_histograms(test.ood_score, ood_scores, threshold,
                                                        selective.method)}
    return numbers, methods, curve, figures


def evaluate_selective(selective, test, labels: np.ndarray, keras_probs: np.ndarray,
                       keras_features: np.ndarray, ood=None) -> tuple[dict, list, str]:
    """The status per image measured and written (`selective_results`, `write_selective`)
    with `selective`, the scores and thresholds the registered version carries: (numbers,
    artifact paths, printed lines)."""
    numbers, methods, curve, figures = selective_results(test, labels, selective, keras_probs,
                                                         keras_features, ood)
    return (numbers, write_selective(methods, curve, figures),
            selective_lines(numbers, selective))


def write_selective(methods, curve, figures: dict) -> list:
    """The selective outputs of evaluate; their paths (for MLflow)."""
    io.write_csv(paths.OOD_METHODS, methods)
    io.write_csv(paths.RISK_COVERAGE, curve)
    for name, png in figures.items():
        io.write_bytes(paths.EVAL_FIGURES / name, png)
    return [paths.OOD_METHODS, paths.RISK_COVERAGE,
            *[paths.EVAL_FIGURES / name for name in figures]]


def selective_lines(numbers: dict, selective) -> str:
    """What evaluate prints of the status per image."""
    lines = [f"  status: {numbers['coverage']:.1%} of the test images answered ok (accuracy "
             f"{numbers['accuracy_answered']:.4f}), {numbers['unsure_share']:.1%} unsure, "
             f"{numbers['unknown_share']:.1%} unknown ({selective.method}); AURC "
             f"{numbers['aurc']:.4f}"]
    if "ood_images" in numbers:
        lines.append(f"  images of none of the classes: {numbers['ood_flagged_unknown']:.1%} "
                     f"of {numbers['ood_images']} flagged unknown ({numbers['ood_flagged']:.1%}"
                     f" not ok); AUROC {numbers['ood_auroc']:.4f}, FPR at 95% TPR "
                     f"{numbers['ood_fpr_at_95_tpr']:.4f}; every method: {paths.OOD_METHODS}")
    return "\n".join(lines)
