"""Batched prediction over image files, shared by evaluate and `imgclf predict`.

Files are decoded with the pipeline's rules in a thread pool (Pillow releases the GIL while
decoding), a batch at a time, so memory holds one batch of pixels however many files there
are. A file that cannot be read is reported, not fatal.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from imgclf.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    is_ignored,
    is_image_name,
    load_pixels,
)
from imgclf.serving.runners import LoadedModel


def _decode(path: str, size: int, resize: str, max_pixels: int):
    try:
        return load_pixels(path, size, resize, max_pixels), None
    except ImageRejected as err:
        return None, str(err)
    except OSError as err:
        return None, f"unreadable: {err.strerror or err}"


def iter_batches(files: list[str], size: int, resize: str, batch_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4,
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """(indices of good files, their pixels, [(index, reason) of bad files]) per batch."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = list(pool.map(lambda f: _decode(f, size, resize, max_pixels), chunk))
            good = [start + i for i, (px, _) in enumerate(decoded) if px is not None]
            bad = [(start + i, err) for i, (px, err) in enumerate(decoded) if px is None]
            pixels = np.stack([decoded[i - start][0] for i in good]).astype(np.float32) \
                if good else np.zeros((0, size, size, 3), np.float32)
            yield good, pixels, bad


def _over_files(model: LoadedModel, files: list[str], batch_size: int, on_batch):
    """`model.predict` on every readable file's pixels, a batch at a time: (its outputs per
    batch, indices of the files read, failures)."""
    outputs, all_good, all_bad = [], [], []
    for good, pixels, bad in iter_batches(files, model.image_size, model.resize,
                                          batch_size, model.max_pixels):
        if good:
            outputs.append(model.predict(pixels))
            all_good += good
        all_bad += bad
        if on_batch is not None:
            on_batch(len(good) + len(bad))
    return outputs, all_good, all_bad


def predict_files(model: LoadedModel, files: list[str], batch_size: int = 32,
                  on_batch: Callable[[int], object] | None = None,
                  ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Probabilities for every readable file: (probs, their indices in files, failures).
    `on_batch(n)` hears of every n files done (a progress bar's update)."""
    outputs, good, bad = _over_files(model, files, batch_size, on_batch)
    probs = (np.concatenate(outputs) if outputs
             else np.zeros((0, len(model.classes)), np.float32))
    return probs, good, bad


def forward_files(model: LoadedModel, files: list[str], batch_size: int = 32,
                  on_batch: Callable[[int], object] | None = None):
    """`predict_files` for a model whose `predict` is a `runners.Forward`: (probs, pooled
    features, indices of the files read, failures)."""
    outputs, good, bad = _over_files(model, files, batch_size, on_batch)
    if not outputs:
        return (np.zeros((0, len(model.classes)), np.float32), np.zeros((0, 0), np.float32),
                good, bad)
    return (np.concatenate([p for p, _ in outputs]), np.concatenate([f for _, f in outputs]),
            good, bad)


@dataclass
class ServedAnswers:
    """What the served model answered for the files it could read, row for row."""

    probs: np.ndarray                 # (n, classes)
    good: list[int]                   # indices of the answered files
    bad: list[tuple[int, str]]        # (index, reason) of the others
    status: list[str] = field(default_factory=list)   # ok | unsure | unknown
    ood_score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # every method's, if asked


def predict_served(served, files: list[str], num_classes: int, batch_size: int = 32,
                   tta: bool = False, on_batch: Callable[[int], object] | None = None,
                   scores: bool = False) -> ServedAnswers:
    """What the served model answers for each file, sent as a client sends it (base64 file
    bytes through the pyfunc's `predict`); `scores`: every out-of-distribution method's."""
    all_probs, all_good, all_bad, status, ood, every = [], [], [], [], [], []
    for start in range(0, len(files), batch_size):
        chunk, payload = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                payload.append(base64.b64encode(Path(files[i]).read_bytes()).decode("ascii"))
                chunk.append(i)
            except OSError as err:
                all_bad.append((i, f"unreadable: {err.strerror or err}"))
        if chunk:
            try:
                out = served.predict(pd.DataFrame({"image": payload}),
                                     params={"probabilities": True, "tta": tta, "top_k": 1,
                                             "scores": scores})
            except Exception as err:  # the whole request refused: none of it was readable
                all_bad += [(i, str(err).splitlines()[0]) for i in chunk]
            else:
                for i, row in zip(chunk, out.to_dict("records"), strict=True):
                    if row["error"]:
                        all_bad.append((i, row["error"]))
                        continue
                    all_good.append(i)
                    all_probs.append(np.asarray(json.loads(row["probabilities"]), np.float32))
                    status.append(row["status"])
                    ood.append(row["ood_score"])
                    if scores:
                        every.append(json.loads(row["scores"]))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(files)) - start)
    probs = np.stack(all_probs) if all_probs else np.zeros((0, num_classes), np.float32)
    by_method = {m: np.array([row[m] for row in every]) for m in (every[0] if every else {})}
    return ServedAnswers(probs, all_good, sorted(all_bad), status, np.asarray(ood, float),
                         by_method)


def collect_images(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files from paths and folders (recursed, sorted); (files, paths that do not exist).

    Hidden files and folders are skipped only *below* each folder given: the folder itself
    may be `../photos` or lie under `~/.cache`, as users type it.
    """
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*")
                            if p.is_file() and not is_ignored(p) and is_image_name(p)
                            and not any(part.startswith(".")
                                        for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(str(path))
        else:
            missing.append(item)
    return files, missing
