"""Held-out metrics from predicted probabilities: pure functions, no model, no disk."""

from __future__ import annotations

import numpy as np
import pandas as pd

# scikit-learn is imported by the functions that use it: the stages that only compare
# formats (package, register, export) read this module too, and importing it costs seconds.


def summary_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """accuracy, top5_accuracy, macro/weighted F1, log loss, n_test."""
    from sklearn.metrics import f1_score, log_loss, top_k_accuracy_score

    num_classes = probs.shape[1]
    classes = np.arange(num_classes)
    predicted = probs.argmax(axis=1)
    return {
        "accuracy": float((predicted == labels).mean()),
        # With 5 classes or fewer the true class is always in the top 5.
        "top5_accuracy": float(top_k_accuracy_score(labels, probs, k=5, labels=classes))
        if num_classes > 5 else 1.0,
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro",
                                   zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, labels=classes, average="weighted",
                                      zero_division=0)),
        # Clipped and each row rescaled to sum 1, as Kaggle scores submissions: a quantised
        # model's float32 probabilities may sum to 1 +- 1e-6.
        "log_loss": float(log_loss(labels, _normalised(probs), labels=classes)),
        "n_test": int(len(labels)),
    }


def _normalised(probs: np.ndarray) -> np.ndarray:
    clipped = np.clip(probs.astype(np.float64), 1e-7, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def per_class_table(probs: np.ndarray, labels: np.ndarray, class_names: list[str]):
    from sklearn.metrics import precision_recall_fscore_support

    classes = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, probs.argmax(axis=1), labels=classes, zero_division=0)
    return pd.DataFrame({"class": class_names, "precision": precision, "recall": recall,
                         "f1": f1, "support": support})


def confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, probs.argmax(axis=1), labels=np.arange(num_classes))


def confused_pairs(matrix: np.ndarray, class_names: list[str], top: int = 20) -> pd.DataFrame:
    """The most frequent (actual, predicted) mistakes, with the share of the actual class."""
    rows = []
    support = matrix.sum(axis=1)
    for a, p in zip(*np.nonzero(matrix), strict=True):
        if a != p:
            rows.append({"actual": class_names[a], "predicted": class_names[p],
                         "count": int(matrix[a, p]),
                         "share_of_actual": round(float(matrix[a, p] / support[a]), 4)})
    frame = pd.DataFrame(rows, columns=["actual", "predicted", "count", "share_of_actual"])
    return frame.sort_values(["count", "share_of_actual", "actual"],
                             ascending=[False, False, True]).head(top).reset_index(drop=True)


def confidently_wrong(probs: np.ndarray, labels: np.ndarray, count: int) -> list[int]:
    """Indices of the wrong predictions with the highest confidence, most confident first."""
    predicted = probs.argmax(axis=1)
    wrong = np.nonzero(predicted != labels)[0]
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:count]]


def errors_table(probs: np.ndarray, labels: np.ndarray, files: list[str],
                 class_names: list[str]) -> pd.DataFrame:
    """Every misclassified image with its true and predicted class, the confidence of the
    prediction and the image's loss (-log p(true class)), highest loss first: the files most
    worth a look when cleaning labels."""
    predicted = probs.argmax(axis=1)
    wrong = np.nonzero(predicted != labels)[0]
    true_p = np.clip(probs[wrong, labels[wrong]].astype(np.float64), 1e-12, 1.0)
    frame = pd.DataFrame({
        "path": [files[i] for i in wrong],
        "true_label": [class_names[labels[i]] for i in wrong],
        "predicted_label": [class_names[predicted[i]] for i in wrong],
        "confidence": np.round(probs[wrong, predicted[wrong]].astype(np.float64), 6),
        "loss": np.round(-np.log(true_p), 6),
    })
    return frame.sort_values(["loss", "path"], ascending=[False, True]).reset_index(drop=True)


# A close call: the reference's top-1 leads its runner-up by less than this probability.
# Round-off (another decoder, quantised weights) may flip it without being wrong, and a
# random-init model (tests, the demo) answers almost every image with one.
CLOSE_CALL_MARGIN = 0.02
# The gates a quantised (or reduced-precision) copy passes to serve or be recommended: its
# decided top-1 agreement with Keras ...
QUANTISED_MIN_AGREEMENT = 0.98
# ... and the pooled features the status reads (the out-of-distribution score) close to
# Keras's on every checked image: the smallest cosine similarity between them. kNN, the
# default score, compares normalised features, so this bounds what moves it.
FEATURES_MIN_COSINE = 0.999


def stands_in(decided_agreement: float, features_cosine: float) -> bool:
    """Whether a copy checked against Keras may stand in for it (serve, be recommended): both
    gates, one rule for every stage that decides it."""
    return (decided_agreement >= QUANTISED_MIN_AGREEMENT
            and features_cosine >= FEATURES_MIN_COSINE)


def decided(reference: np.ndarray, margin: float = CLOSE_CALL_MARGIN) -> np.ndarray:
    """Which rows of `reference` are no close call."""
    if reference.shape[1] < 2:
        return np.ones(len(reference), dtype=bool)
    top2 = np.sort(reference, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= margin


def parity(reference: np.ndarray, probs: np.ndarray) -> dict:
    """How far another format's probabilities are from the reference's: top-1 agreement (on
    every row, and on the rows that are no close call, `decided_*`: 1.0 when there are none)
    and the largest absolute difference."""
    same = reference.argmax(1) == probs.argmax(1)
    counted = decided(reference)
    return {"top1_agreement": round(float(same.mean()), 6),
            "decided_top1_agreement": round(float(same[counted].mean()), 6)
            if counted.any() else 1.0,
            "decided_images": int(counted.sum()),
            "max_abs_diff": float(np.abs(reference - probs).max()) if len(probs) else 0.0}


def min_cosine(reference: np.ndarray, features: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows of two feature arrays."""
    dot = (reference * features).sum(1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(features, axis=1)
    return round(float((dot / np.maximum(norms, 1e-12)).min()), 6) if len(features) else 1.0


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant, which the softmax ignores."""
    return np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0))


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities the same logits give at `temperature` (softmax(log p / T))."""
    z = log_probs(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    scaled = with_temperature(probs, temperature)
    return float(-np.log(np.clip(scaled[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: its range, how many predictions fall in it, their mean confidence
    and their accuracy. A calibrated model's accuracy equals its confidence in every bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        rows.append({"lower": edges[i], "upper": edges[i + 1], "count": count,
                     "confidence": float(confidence[members].mean()) if count else np.nan,
                     "accuracy": float(correct[members].mean()) if count else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin share of predictions) x |accuracy - mean confidence|."""
    table = reliability(probs, labels, bins)
    filled = table[table["count"] > 0]
    if filled.empty:
        return 0.0
    gaps = (filled["accuracy"] - filled["confidence"]).abs()
    return float((filled["count"] * gaps).sum() / filled["count"].sum())


def epoch_metrics(row: dict) -> dict[str, float]:
    """The numbers of one training history row that are metrics (not timings, not NaN)."""
    return {k: v for k, v in row.items()
            if isinstance(v, float) and k not in ("epoch_seconds",) and v == v}


def ood_separation(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """How well an out-of-distribution score (higher: more unusual) tells images of none of
    the classes (`out_scores`) from images of them (`in_scores`): the AUROC, and the false
    positive rate at 95% true positive rate as the OOD literature reports it (the share of
    out-of-distribution images that pass as in-distribution at the threshold that keeps
    95% of the in-distribution ones)."""
    from sklearn.metrics import roc_auc_score

    if len(in_scores) == 0 or len(out_scores) == 0:
        return {"auroc": float("nan"), "fpr_at_95_tpr": float("nan")}
    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    auroc = roc_auc_score(truth, np.r_[in_scores, out_scores])
    threshold = np.quantile(in_scores, 0.95, method="higher")
    return {"auroc": float(auroc), "fpr_at_95_tpr": float((out_scores <= threshold).mean())}
