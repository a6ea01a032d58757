"""Pictures people would rather look at than read: training curves, augmentation preview."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no screen on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def training_curves(history: list[dict]) -> bytes:
    """Accuracy and loss, train vs val, by epoch across both phases; the boundary marked."""
    epochs = [row["epoch"] + 1 for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, [r[metric] for r in history], "o-", label=f"train {metric}")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label=f"val {metric}")
        finetune = [r["epoch"] + 1 for r in history if r["phase"] == "finetune"]
        if finetune and len(finetune) < len(history):
            ax.axvline(finetune[0] - 0.5, color="grey", linestyle="--")
            ax.text(finetune[0] - 0.45, ax.get_ylim()[1], " fine-tune", va="top",
                    color="grey")
        best = [r["epoch"] + 1 for r in history if r.get("best")]
        if best:
            ax.axvline(best[-1], color="green", alpha=0.3, linewidth=6, label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def augment_grid(rows: list[tuple[str, list[np.ndarray]]]) -> bytes:
    """One row per image: its class, the original, then augmented views (uint8 arrays)."""
    n_cols = max(len(views) for _, views in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.1 * len(rows)),
                             squeeze=False)
    for r, (label, views) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(views):
                ax.imshow(np.clip(views[c], 0, 255).astype(np.uint8))
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
        axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=9)
    fig.suptitle("Training augmentation (seeded)", fontsize=11)
    return _png(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: list[str]) -> bytes:
    """Row-normalised confusion matrix, sized to the class count so 120 labels stay legible."""
    n = len(class_names)
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros(matrix.shape, float),
                           where=support > 0)
    side = max(6.0, 0.16 * n + 3.0)
    fontsize = max(5.0, min(10.0, 420.0 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(side, side * 0.92))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (each row sums to 1)")
    if n <= 25:
        for a in range(n):
            for p in range(n):
                if matrix[a, p]:
                    ax.text(p, a, f"{normalised[a, p]:.2f}", ha="center", va="center",
                            fontsize=fontsize * 0.8,
                            color="white" if normalised[a, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    return _png(fig)


def per_class_f1_png(names: list[str], f1: list[float]) -> bytes:
    order = np.argsort(f1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.17 * n + 1.2)))
    ax.barh(range(n), [f1[i] for i in order], color="tab:blue")
    ax.set_yticks(range(n), [names[i] for i in order],
                  fontsize=max(5.0, min(10.0, 420.0 / max(n, 1))))
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test split")
    ax.set_title("Per-class F1 (worst at the bottom)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def image_grid(images: list[np.ndarray], captions: list[str], title: str,
               columns: int = 6) -> bytes:
    if not images:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        return _png(fig)
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.6 * rows),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.set_title(captions[i], fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def reliability_diagram(before, after, ece_before: float, ece_after: float,
                        temperature: float) -> bytes:
    """Accuracy against confidence per bin (tables from `metrics.reliability`), before and
    after temperature scaling: a calibrated model's bars touch the diagonal."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    panels = ((axes[0], before, f"uncalibrated (T = 1): ECE {ece_before:.3f}"),
              (axes[1], after, f"temperature {temperature:.2f}: ECE {ece_after:.3f}"))
    for ax, table, title in panels:
        width = float(table["upper"].iloc[0] - table["lower"].iloc[0])
        filled = table[table["count"] > 0]
        ax.bar(filled["lower"], filled["accuracy"], width=width, align="edge",
               color="tab:blue", edgecolor="black", alpha=0.8, label="accuracy")
        ax.bar(filled["lower"], filled["confidence"] - filled["accuracy"],
               bottom=filled["accuracy"], width=width, align="edge", color="tab:red",
               alpha=0.25, edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on the test split")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability diagram", fontsize=11)
    return _png(fig)


def risk_coverage_png(curve, served: tuple[float, float] | None, aurc: float) -> bytes:
    """Accuracy of the answers kept against the share kept, at every confidence threshold
    (a table from `model.selective.risk_coverage`); the served threshold's point marked."""
    fig, ax = plt.subplots(figsize=(6, 4.4))
    ax.plot(curve["coverage"], curve["accuracy"], "-", color="tab:blue",
            drawstyle="steps-post", label=f"every threshold (AURC {aurc:.3f})")
    if served is not None:
        ax.plot([served[0]], [served[1]], "o", color="tab:red", markersize=8,
                label=f"served threshold: {served[0]:.0%} kept, accuracy {served[1]:.3f}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(max(0.0, float(curve["accuracy"].min()) - 0.05) if len(curve) else 0, 1.01)
    ax.set_xlabel("coverage (share of test images answered)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_title("Risk-coverage: answering less, answering better")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def score_histograms(in_scores: np.ndarray, out_scores: np.ndarray | None, threshold: float,
                     method: str) -> bytes:
    """The out-of-distribution score of test images and (when given) of images of none of
    the classes, with the threshold above which the served model says `unknown`."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = [s[np.isfinite(s)] for s in (in_scores, out_scores) if s is not None and len(s)]
    values = np.concatenate(finite) if finite else np.zeros(1)
    bins = np.linspace(values.min(), values.max() + 1e-9, 40)
    ax.hist(in_scores, bins=bins, alpha=0.6, color="tab:blue", density=True,
            label=f"test images ({len(in_scores)})")
    if out_scores is not None and len(out_scores):
        ax.hist(out_scores, bins=bins, alpha=0.6, color="tab:orange", density=True,
                label=f"images of none of the classes ({len(out_scores)})")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="tab:red", linestyle="--", label="unknown above this")
    ax.set_xlabel(f"{method} score (higher: more unlike the training images)")
    ax.set_ylabel("density")
    ax.set_title("Out-of-distribution score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
