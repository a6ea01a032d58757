"""Resume state of an interrupted training run: written atomically after every epoch.

models/checkpoints/last/ holds the weights that change (the head's in phase 1; in phase 2
the head's and the unfrozen top's), the current optimizer's variables
(slots, step counter, learning rate), the tracker state (epochs done, phase, best so far,
history) and the MLflow run id. A fingerprint of the params and the data guards it: a state
left by a different configuration is never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from imgclf import io
from imgclf.training.phases import TrackerState

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


# Keys that cannot change what a training computes: the augmentation preview's, and resume.
NOT_TRAINING = frozenset({"train.resume", "augment.seed", "augment.preview_images",
                          "augment.preview_views", "features.max_gb"})


def fingerprint(params_flat: dict, data_version: str) -> str:
    relevant = {k: v for k, v in params_flat.items()
                if k.split(".")[0] in ("model", "augment", "features", "train")
                and k not in NOT_TRAINING}
    blob = json.dumps({"params": relevant, "data": data_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save(directory: Path, model, optimizer_arrays: list[np.ndarray] | None,
         state: TrackerState, fp: str, run_id: str | None,
         same_weights_as: Path | None = None, scope: str = "full") -> None:
    """`model`: what saves what changes (`scope` head: the head alone, in phase 1; top: the
    head and the unfrozen top, in phase 2; see `phases.holding`). `same_weights_as`: a
    weights file already holding those weights (the best epoch's, just saved): linked, not
    written again."""
    with io.replaced_dir(directory) as staging:
        if same_weights_as is None or not _linked(same_weights_as, staging / WEIGHTS_FILE):
            model.save_weights(staging / WEIGHTS_FILE)
        if optimizer_arrays:
            np.savez(staging / OPTIMIZER_FILE, *optimizer_arrays)
        meta = {"fingerprint": fp, "run_id": run_id, "scope": scope,
                "state": dataclasses.asdict(state)}
        (staging / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _linked(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system, or across two of them
        return False
    return True


@dataclasses.dataclass
class Saved:
    state: TrackerState
    run_id: str | None
    weights: Path
    optimizer_arrays: list[np.ndarray] | None
    scope: str = "full"  # what `weights` holds: head (phase 1) | top (phase 2) | full


def load(directory: Path, fp: str) -> Saved | None:
    """The saved state if it belongs to this configuration and is complete, else None."""
    meta_path = directory / STATE_FILE
    if not meta_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("fingerprint") != fp:
        return None
    arrays = None
    if (directory / OPTIMIZER_FILE).is_file():
        with np.load(directory / OPTIMIZER_FILE) as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return Saved(state=TrackerState(**meta["state"]), run_id=meta.get("run_id"),
                 weights=directory / WEIGHTS_FILE, optimizer_arrays=arrays,
                 scope=meta.get("scope", "full"))
