"""Batched prediction over image files, shared by evaluate and `imgclf predict`.

Files are decoded with the pipeline's rules in a thread pool (Pillow releases the GIL while
decoding), a batch at a time, so memory holds one batch of pixels however many files there
are. A file that cannot be read is reported, not fatal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.images import ImageRejected, is_ignored, is_image_name, load_pixels

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 pixels (n, s, s, 3) -> probs (n, c)


@dataclass
class LoadedModel:
    predict: Predictor
    classes: list[str]
    image_size: int
    resize: str
    source: str
    # Larger images are refused from their header, before decoding (prepare.max_pixels of
    # the training, or the pipeline default).
    max_pixels: int = 64_000_000


def keras_predictor(model, tta: bool = False) -> Predictor:
    """Batch -> probabilities; with tta, the mean over the image and its horizontal flip."""

    import tensorflow as tf

    # A compiled call of the model: measured 1.6x Keras's predict() at batch 32 on a CPU.
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(batch: np.ndarray) -> np.ndarray:
        probs = forward(batch).numpy()
        if tta:
            probs = (probs + forward(np.ascontiguousarray(batch[:, :, ::-1, :])).numpy()) / 2.0
        return probs

    return predict


def _decode(path: str, size: int, resize: str, max_pixels: int):
    try:
        return load_pixels(path, size, resize, max_pixels), None
    except ImageRejected as err:
        return None, str(err)
    except OSError as err:
        return None, f"unreadable: {err.strerror or err}"


def iter_batches(files: list[str], size: int, resize: str, batch_size: int,
                 max_pixels: int = 64_000_000, workers: int = 4,
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


def predict_files(model: LoadedModel, files: list[str], batch_size: int = 32,
                  progress: bool = True,
                  ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Probabilities for every readable file: (probs, their indices in files, failures)."""
    all_probs, all_good, all_bad = [], [], []
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for good, pixels, bad in iter_batches(files, model.image_size, model.resize,
                                              batch_size, model.max_pixels):
            if good:
                all_probs.append(model.predict(pixels))
                all_good += good
            all_bad += bad
            bar.update(len(good) + len(bad))
    probs = (np.concatenate(all_probs) if all_probs
             else np.zeros((0, len(model.classes)), np.float32))
    return probs, all_good, all_bad


def collect_images(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files from paths and folders (recursed, sorted); (files, paths that do not exist)."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*")
                            if p.is_file() and not is_ignored(p) and is_image_name(p)
                            and not any(part.startswith(".") for part in p.parts))
        elif path.is_file():
            files.append(str(path))
        else:
            missing.append(item)
    return files, missing


def load_keras_file(path: Path, classes_path: Path, image_size: int | None,
                    resize: str, tta: bool = False, max_pixels: int = 64_000_000,
                    ) -> LoadedModel:
    import keras

    model = keras.models.load_model(path, safe_mode=True)
    size = image_size or int(model.input_shape[1])
    classes = json.loads(classes_path.read_text(encoding="utf-8"))
    return LoadedModel(keras_predictor(model, tta), classes, size, resize, str(path),
                       max_pixels)
