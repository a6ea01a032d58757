"""The input pipeline shared by train, evaluate and predict: manifests -> tf.data batches.

Images are decoded by the same Python code that `prepare` validated them with (EXIF
rotation, first GIF frame, RGB rules), inside `tf.numpy_function` so decoding runs in
parallel threads (Pillow releases the GIL while decoding) and batches stream: the dataset is
never loaded whole into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from stages import paths
from stages.errors import UserError
from stages.images import load_pixels


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


def _loader(files: list[str], image_size: int, resize: str):
    files_t = tf.constant(files)

    def load(index: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(
            lambda p: load_pixels(p.decode("utf-8"), image_size, resize),
            [tf.gather(files_t, index)], tf.uint8, stateful=False)
        image.set_shape((image_size, image_size, 3))
        return image

    return load


def image_dataset(
    files: list[str],
    labels: np.ndarray | None,
    num_classes: int,
    image_size: int,
    resize: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augmenter=None,
) -> tf.data.Dataset:
    """Batches of (float32 pixels 0-255, one-hot labels), or pixels alone when labels is None.

    Shuffling happens on indices (cheap) before decoding; augmentation, training only, runs
    on whole batches after decoding.
    """
    ds = tf.data.Dataset.from_tensor_slices(np.arange(len(files), dtype=np.int64))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    load = _loader(files, image_size, resize)
    if labels is not None:
        onehot = tf.one_hot(tf.constant(labels, dtype=tf.int32), num_classes)
        ds = ds.map(lambda i: (load(i), tf.gather(onehot, i)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)

    def to_float(x, *rest):
        x = tf.cast(x, tf.float32)
        if augmenter is not None:
            x = augmenter(x, training=True)
        return (x, *rest) if rest else x

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
