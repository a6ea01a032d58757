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
