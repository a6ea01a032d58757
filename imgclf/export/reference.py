"""The Keras model's own probabilities (and pooled features) on the test split, computed once.

`package` has the model loaded and its forward pass traced (for the serving copy's check on
validation images), so it runs the test split through it once and writes
models/keras_test_probs.npz. `evaluate` reports the served model's numbers beside these, and
`export` checks every format against them: neither stage loads the Keras model to run the
same forward pass again. The file names the model (its weights digest) and the test files it
was computed for, and a reader refuses it for any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf import io, paths
from imgclf.data.manifests import files_digest
from imgclf.errors import UserError


def write(forward, files: list[str], image_size: int, resize: str, max_pixels: int,
          weights_digest: str, path: Path = paths.KERAS_TEST_PROBS) -> np.ndarray:
    """`forward` (the Keras model's compiled call: probabilities and pooled features) over
    every test file, decoded as evaluate decodes them, written atomically to `path`; returns
    the probabilities."""
    from imgclf.serving.batches import forward_files
    from imgclf.serving.runners import CHUNK, LoadedModel

    probs, features, _, bad = forward_files(LoadedModel(forward, [], image_size, resize,
                                                        "keras", max_pixels), files, CHUNK)
    if bad:
        raise UserError(f"test image {files[bad[0][0]]} cannot be read ({bad[0][1]}): "
                        "rerun the prepare stage")
    probs = probs.astype(np.float32)
    with io.replacing(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, probs=probs, features=features.astype(np.float32),
                 files=files_digest(files), weights=weights_digest)
    return probs


def read(files: list[str], weights_digest: str, path: Path = paths.KERAS_TEST_PROBS,
         with_features: bool = False):
    """The stored probabilities, one row per file of `files` (with_features: and the pooled
    features, as a pair); UserError when they were computed for another model or other test
    files."""
    if not path.is_file():
        raise UserError(f"{path} not found: run the package stage (dvc repro package)")
    with np.load(path) as stored:
        if (str(stored["weights"]) != weights_digest
                or str(stored["files"]) != files_digest(files) or "features" not in stored):
            raise UserError(f"{path} was computed for another model or test split: run the "
                            "package stage again (dvc repro package)")
        return (stored["probs"], stored["features"]) if with_features else stored["probs"]
