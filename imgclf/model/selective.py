"""Saying "not one of my classes" and "not sure": a status per image beside its answer.

- `unknown`: the image lies outside what the model was trained on. The score is computed on
  the fine-tuned network's own pooled features (the head's input), one of
  - `mahalanobis`: the squared Mahalanobis distance to the nearest class mean, with one
    covariance shared by every class (Lee et al., NeurIPS 2018), shrunk (Ledoit-Wolf) so it
    stays invertible with fewer images than feature channels;
  - `knn`: the distance to the k-th nearest training image, on L2-normalised features (Sun
    et al., ICML 2022), k growing with the training split (`KNN_PER`);
  - `energy`: minus the log-sum-exp of the logits (Liu et al., NeurIPS 2020), the logits
    computed from the features by the head's own weights.
  Higher is more unusual. The threshold keeps a chosen share of the validation images.
- `unsure`: the calibrated confidence is below the threshold at which the validation answers
  kept reach a target accuracy (selective prediction).
- `ok`: neither.

Scoring is numpy only: the registered model carries this file and runs it beside the network
(no TensorFlow, no scikit-learn at serving time). Fitting happens once, in the `selective`
stage, from the features `train` stored (models/embeddings.npz).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METHODS = ("mahalanobis", "knn", "energy")
OK, UNSURE, UNKNOWN = "ok", "unsure", "unknown"
# The neighbour whose distance is the score: one per KNN_PER training images (within
# KNN_K_MAX), so that it stays a near neighbour within the image's own class however large
# the training split; a fixed k larger than a small class would measure the distance to
# other classes instead.
KNN_PER, KNN_K_MAX = 100, 50
KNN_BANK = 10_000  # training images kept for knn (evenly spaced): bounds the served file


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def head_logits(features: np.ndarray, kernels: list[np.ndarray],
                biases: list[np.ndarray]) -> np.ndarray:
    """The head's dense layers on the pooled features, without the last softmax (ReLU
    between them, as `model.network` builds it; its dropout is off at inference)."""
    x = features.astype(np.float32)
    for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        x = x @ kernel + bias
        if i < len(kernels) - 1:
            x = np.maximum(x, 0.0)
    return x


@dataclass
class Selective:
    """The fitted scores and the thresholds the served model applies.

    `method`: the served out-of-distribution score; `ood_threshold` (None: check off): above
    it an image is `unknown`; `confidence_threshold` (None: check off): below it `unsure`.
    `thresholds`: each method's threshold at the same share of validation images kept.
    """

    method: str
    ood_threshold: float | None
    confidence_threshold: float | None
    thresholds: dict[str, float]
    arrays: dict[str, object] = field(repr=False)
    notes: dict = field(default_factory=dict)  # how the thresholds were chosen

    def score(self, features: np.ndarray, method: str | None = None) -> np.ndarray:
        """One method's (default: the served one's) out-of-distribution score of each row of
        `features`."""
        f = np.asarray(features, np.float32)
        method = method or self.method
        if method == "mahalanobis":
            whitened = f @ self.arrays["maha_whitening"]
            means = self.arrays["maha_means"]
            # ||z - m||^2 = ||z||^2 - 2 z.m + ||m||^2, for every class mean at once
            d2 = ((whitened ** 2).sum(1, keepdims=True) - 2.0 * whitened @ means.T
                  + (means ** 2).sum(1)[None, :])
            return np.maximum(d2.min(axis=1), 0.0)
        if method == "knn":
            unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            if "_bank" not in self.__dict__:  # float16 on disk, float32 to multiply
                self._bank = self.arrays["knn_bank"].astype(np.float32).T
            similarity = unit @ self._bank
            k = min(int(self.arrays["knn_k"]), similarity.shape[1])
            kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
            return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        if method == "energy":
            return -_logsumexp(head_logits(f, self.arrays["head_kernels"],
                                           self.arrays["head_biases"]))
        raise ValueError(f"unknown out-of-distribution method {method!r}")

    def scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every method's out-of-distribution score of each row of `features`."""
        return {method: self.score(features, method) for method in METHODS}

    def status(self, probs: np.ndarray, features: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray]:
        """(each image's status, its served out-of-distribution score)."""
        score = self.score(features)
        return statuses(probs.max(axis=1), score, self.confidence_threshold,
                        self.ood_threshold), score

    def save(self, path: Path) -> None:
        meta = {"method": self.method, "ood_threshold": self.ood_threshold,
                "confidence_threshold": self.confidence_threshold,
                "thresholds": self.thresholds, "notes": self.notes}
        arrays = {k: v for k, v in self.arrays.items() if k not in ("head_kernels",
                                                                     "head_biases")}
        arrays.update(pack_head(self.arrays["head_kernels"], self.arrays["head_biases"]))
        import json

        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Selective:
        import json

        with np.load(path) as stored:
            meta = json.loads(str(stored["meta"]))
            arrays = {k: stored[k] for k in stored.files
                      if k != "meta" and not k.startswith("head_")}
            arrays["head_kernels"], arrays["head_biases"] = unpack_head(stored)
        return cls(meta["method"], meta["ood_threshold"], meta["confidence_threshold"],
                   meta["thresholds"], arrays, meta.get("notes", {}))


def pack_head(kernels: list[np.ndarray], biases: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The head's dense layers as named arrays of one `.npz` (input to output)."""
    return {**{f"head_kernel_{i}": k for i, k in enumerate(kernels)},
            **{f"head_bias_{i}": b for i, b in enumerate(biases)}}


def unpack_head(stored) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`pack_head`'s arrays back from a loaded `.npz`: (kernels, biases)."""
    layers = sum(1 for k in stored.files if k.startswith("head_kernel_"))
    return ([stored[f"head_kernel_{i}"] for i in range(layers)],
            [stored[f"head_bias_{i}"] for i in range(layers)])


def statuses(confidence: np.ndarray, score: np.ndarray, confidence_threshold: float | None,
             ood_threshold: float | None) -> np.ndarray:
    """`unknown` above the OOD threshold (first: an image of no class has no sure answer),
    else `unsure` below the confidence threshold, else `ok`."""
    out = np.full(len(confidence), OK, dtype=object)
    if confidence_threshold is not None:
        out[confidence < confidence_threshold] = UNSURE
    if ood_threshold is not None:
        out[score > ood_threshold] = UNKNOWN
    return out


# ----------------------------------------------------------------------------- fitting


def _shrunk_precision(centred: np.ndarray) -> np.ndarray:
    """The inverse of the Ledoit-Wolf shrunk covariance of `centred` rows."""
    from sklearn.covariance import LedoitWolf

    covariance = LedoitWolf(assume_centered=True).fit(centred.astype(np.float64)).covariance_
    return np.linalg.pinv(covariance, hermitian=True)


def fit_arrays(features: np.ndarray, labels: np.ndarray, num_classes: int,
               kernels: list[np.ndarray], biases: list[np.ndarray]) -> dict[str, object]:
    """Every method's arrays from the training split's features and labels."""
    f = np.asarray(features, np.float64)
    means = np.zeros((num_classes, f.shape[1]))
    for c in range(num_classes):
        rows = f[labels == c]
        # A class with no training image has no mean: placed at infinity, never nearest.
        means[c] = rows.mean(axis=0) if len(rows) else np.inf
    present = np.isfinite(means[:, 0])
    centred = f - means[labels]
    precision = _shrunk_precision(centred)
    # Cholesky of the precision: (x - m)' P (x - m) = ||(x - m) L||^2, a matrix product
    # at serving time. A tiny ridge keeps it positive definite after pinv's round-off.
    ridge = 1e-9 * np.trace(precision) / len(precision)
    whitening = np.linalg.cholesky(precision + ridge * np.eye(len(precision)))
    projected = np.where(present[:, None], np.nan_to_num(means, posinf=0.0) @ whitening, 1e18)
    keep = np.unique(np.linspace(0, len(f) - 1, min(len(f), KNN_BANK)).round().astype(int))
    unit = f[keep] / np.maximum(np.linalg.norm(f[keep], axis=1, keepdims=True), 1e-12)
    return {"maha_whitening": whitening.astype(np.float32),
            "maha_means": projected.astype(np.float32),
            "knn_bank": unit.astype(np.float16),
            "knn_k": np.array(int(np.clip(round(len(f) / KNN_PER), 1, KNN_K_MAX))),
            "head_kernels": [np.asarray(k, np.float32) for k in kernels],
            "head_biases": [np.asarray(b, np.float32) for b in biases]}


def ood_threshold(val_scores: np.ndarray, keep: float) -> float:
    """The score at or below which `keep` of the validation images lie (they are in
    distribution by construction: the same source as the training images)."""
    if len(val_scores) == 0:
        return float("inf")
    return float(np.quantile(val_scores, keep, method="higher"))


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray,
                         target_accuracy: float) -> tuple[float, bool]:
    """(the lowest confidence whose kept answers reach `target_accuracy` on validation,
    whether it is reached). Answers at or above the threshold are kept. Not reached: the
    threshold of the best accuracy any threshold gives (the largest share kept among
    equals). A higher target never keeps more answers."""
    curve = risk_coverage(confidence, correct)
    if curve.empty:
        return 0.0, True
    reached = curve[curve["accuracy"] >= target_accuracy - 1e-12]
    if len(reached):
        return float(reached["threshold"].min()), True
    best = curve[curve["accuracy"] >= curve["accuracy"].max() - 1e-12]
    return float(best["threshold"].min()), False


def risk_coverage(confidence: np.ndarray, correct: np.ndarray):
    """At every distinct confidence threshold (highest first): the share of answers kept
    (confidence >= threshold) and their accuracy. A DataFrame: threshold, coverage, accuracy,
    kept."""
    import pandas as pd

    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.asarray(correct, float)[order]
    if len(conf) == 0:
        return pd.DataFrame(columns=["threshold", "coverage", "accuracy", "kept"])
    cumulative = np.cumsum(hits)
    # The last index of each run of equal confidences: a threshold keeps all of them or none.
    ends = np.nonzero(np.r_[conf[1:] != conf[:-1], True])[0]
    kept = ends + 1
    return pd.DataFrame({"threshold": conf[ends], "coverage": kept / len(conf),
                         "accuracy": cumulative[ends] / kept, "kept": kept})


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The area under the risk-coverage curve (risk = 1 - accuracy of the answers kept),
    over every coverage from one answer to all: 0 when every answer is right, lower is
    better (Geifman & El-Yaniv, 2017)."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.asarray(correct, float)[order]
    if len(hits) == 0:
        return 0.0
    risk = 1.0 - np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(risk.mean())


def fit(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
        val_probs: np.ndarray, val_labels: np.ndarray, kernels: list, biases: list,
        method: str, ood: bool, keep: float, unsure: bool, target_accuracy: float,
        ) -> Selective:
    """The scores fitted on the training split, the thresholds chosen on validation."""
    arrays = fit_arrays(train_features, train_labels, val_probs.shape[1], kernels, biases)
    fitted = Selective(method, None, None, {}, arrays)
    val_scores = fitted.scores(val_features)
    fitted.thresholds = {m: ood_threshold(s, keep) for m, s in val_scores.items()}
    confidence = val_probs.max(axis=1)
    correct = val_probs.argmax(axis=1) == val_labels
    threshold, reached = confidence_threshold(confidence, correct, target_accuracy)
    fitted.ood_threshold = fitted.thresholds[method] if ood else None
    fitted.confidence_threshold = threshold if unsure else None
    kept = confidence >= threshold
    fitted.notes = {
        "train_images": int(len(train_labels)), "val_images": int(len(val_labels)),
        "ood_keep": keep, "target_accuracy": target_accuracy,
        "target_reached": bool(reached),
        "val_coverage": round(float(kept.mean()), 6) if len(kept) else 1.0,
        "val_accuracy_kept": round(float(correct[kept].mean()), 6) if kept.any() else 1.0,
        "val_accuracy": round(float(correct.mean()), 6) if len(correct) else 1.0,
        "val_unknown_share": round(float((val_scores[method] > fitted.thresholds[method])
                                         .mean()), 6) if len(val_labels) else 0.0,
    }
    return fitted
