"""What `prepare` hands every later stage: the split manifests and the class list."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from imgclf import io, paths
from imgclf.errors import UserError


def files_digest(files: list[str]) -> str:
    """A short hash of a list of image paths: what a stored array was computed for."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def data_version() -> str:
    """A short hash of the prepared manifests and classes: same data, same version."""
    digest = hashlib.sha256()
    for path in [paths.manifest(s) for s in paths.SPLITS] + [paths.CLASSES_JSON]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:12]


def read_classes(path: Path = paths.CLASSES_JSON) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_manifest(split: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(paths, integer labels) of one split, labels indexed by classes.json."""
    path = paths.manifest(split)
    if not path.is_file():
        raise UserError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    frame = pd.read_csv(path, dtype={"label": str}, keep_default_na=False)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise UserError(f"{path} has labels missing from classes.json ({unknown[:3]}): "
                        "rerun the prepare stage")
    return frame["path"].tolist(), frame["label"].map(index).to_numpy(dtype=np.int32)


def read_sha256(split: str) -> list[str]:
    """The sha256 of each image file of one split, in manifest order (what `prepare` read)."""
    frame = pd.read_csv(paths.manifest(split), dtype={"sha256": str}, keep_default_na=False)
    return frame["sha256"].tolist()


def evenly_spaced_indices(n: int, count: int) -> list[int]:
    """At most `count` of the indices 0..n-1, evenly spaced through them."""
    if n <= count:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def evenly_spaced(files: list[str], count: int) -> list[str]:
    """At most `count` of `files`, evenly spaced through them: a manifest is sorted by class,
    so every class is sampled."""
    return [files[i] for i in evenly_spaced_indices(len(files), count)]


def sample_files(split: str, count: int) -> list[str]:
    """Up to `count` files of `split`, evenly spaced through its manifest (so every class is
    seen)."""
    return evenly_spaced(read_manifest(split, read_classes())[0], count)


def pixels_of(files: list[str], size: int, resize: str) -> np.ndarray:
    """`files` decoded as float pixels the model takes."""
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.data.images import load_pixels

    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while it decodes
        decoded = list(pool.map(lambda f: load_pixels(f, size, resize), files))
    return np.stack(decoded).astype(np.float32)


def sample_pixels(split: str, count: int, size: int, resize: str) -> np.ndarray:
    """`sample_files(split, count)` as float pixels the model takes."""
    return pixels_of(sample_files(split, count), size, resize)


MANIFEST_COLUMNS = ["path", "label", "sha256", "width", "height"]


def write_prepared(splits: dict[str, list[dict]], classes: list[str]) -> None:
    """data/prepared/ in one rename: the manifests of every split and classes.json."""
    with io.replaced_dir(paths.PREPARED_DIR) as staging:
        for name, records in splits.items():
            io.write_csv(staging / paths.manifest(name).name,
                         pd.DataFrame(records, columns=MANIFEST_COLUMNS))
        io.write_json(staging / paths.CLASSES_JSON.name, classes)
