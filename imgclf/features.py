"""The frozen part of the base, run once: what the `features` stage stores and `train` reads.

With BatchNorm frozen and the base called in inference mode, what the frozen layers compute
is a pure function of the image (and its augmented view). So the stage runs them once per
image and view, for train and val, and stores two arrays per split:

- `pooled`: the pooled output of the whole base (1536 floats), what phase 1's head trains on;
- `cut`: the activations at the fine-tune cut (`network.split_base`), what phase 2's unfrozen
  top and head train on: a phase-2 epoch costs the top block, not the base.

Each array is a `.npy` file of shape (views, images, ...); training reads the rows of each
batch from disk (`os.pread`), so memory does not grow with the dataset. `meta.json` records
what the arrays were made from; `train` refuses arrays made for other data, another cut or
another base.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf import io
from imgclf.data.manifests import files_digest
from imgclf.errors import UserError
from imgclf.params import Params

META = "meta.json"
POOLED_DTYPE = "float32"


@dataclass(frozen=True)
class Plan:
    """What the stage will write, known before any image is read."""

    train_images: int
    val_images: int
    views: int
    pooled_dim: int
    cut_shape: tuple[int, ...] | None
    cut_dtype: str

    def rows(self, split: str) -> int:
        return self.views * self.train_images if split == "train" else self.val_images

    def bytes_per_row(self) -> int:
        cut = (int(np.prod(self.cut_shape)) * np.dtype(self.cut_dtype).itemsize
               if self.cut_shape else 0)
        return cut + self.pooled_dim * np.dtype(POOLED_DTYPE).itemsize

    def total_bytes(self) -> int:
        return (self.rows("train") + self.rows("val")) * self.bytes_per_row()


def check_budget(plan: Plan, params: Params) -> None:
    gb = plan.total_bytes() / 1e9
    if gb > params.features.max_gb:
        raise UserError(
            f"features.max_gb = {params.features.max_gb:g} is below the {gb:.1f} GB the "
            f"features stage needs ({plan.train_images} train images x {plan.views} view(s) + "
            f"{plan.val_images} val, {plan.bytes_per_row() / 1e3:.0f} KB each at "
            f"model.image_size {params.model.image_size}): raise features.max_gb, lower "
            "features.views or model.image_size, use features.dtype float16, unfreeze fewer "
            "layers (train.unfreeze), or set features.cache false")


def _extractor(classifier, split):
    """Raw pixels -> (cut activations, pooled features), or the pooled features alone."""
    import keras

    pixels = keras.Input(classifier.model.input_shape[1:], name="pixels")
    x = classifier.model.get_layer("scale_to_unit")(pixels)
    pool = classifier.pool
    if split is None:
        return keras.Model(pixels, pool(classifier.base(x, training=False)))
    bottom, top = split
    cut = bottom(x, training=False)
    return keras.Model(pixels, [cut, pool(top(cut, training=False))])


def extraction_batch(image_size: int) -> int:
    """Images per forward pass: the pixels of 32 images at 299 px, at most 128 images. Small
    images in bigger batches keep the CPU's matrix units busy; memory stays that of a 299 px
    batch of 32."""
    return max(1, min(128, 32 * 299 * 299 // (image_size * image_size)))


def cut_shape(split) -> tuple[int, ...] | None:
    """The shape of one image's activations at the cut (`network.split_base`'s), or None."""
    return tuple(int(d) for d in split[1].input_shape[1:]) if split else None


def plan_for(params: Params, split, train_images: int, val_images: int) -> Plan:
    from imgclf.model.network import FEATURE_DIM

    return Plan(train_images, val_images, params.features.views, FEATURE_DIM, cut_shape(split),
                params.features.dtype)


def write(directory: Path, classifier, params: Params, train_files: list[str],
          val_files: list[str]) -> dict:
    """Run the frozen base over train (every view) and val and store the arrays in
    `directory`, replaced in one rename; returns the meta it records."""
    import tensorflow as tf

    from imgclf.data.pipeline import image_dataset
    from imgclf.model.augmentation import augmenter
    from imgclf.model.network import split_base, weights_digest

    split = split_base(classifier.base, params.train.unfreeze)
    plan = plan_for(params, split, len(train_files), len(val_files))
    check_budget(plan, params)
    print(f"features: storing {plan.total_bytes() / 1e6:,.1f} MB: "
          f"{plan.train_images} train images x {plan.views} view(s) + {plan.val_images} val; "
          + (f"activations below {params.train.unfreeze} "
             f"{'x'.join(map(str, plan.cut_shape))} {plan.cut_dtype} and " if split else "")
          + f"pooled {plan.pooled_dim} {POOLED_DTYPE}")
    extractor = _extractor(classifier, split)
    spec = tf.TensorSpec((None, *extractor.input_shape[1:]), tf.float32)
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    batch = extraction_batch(params.model.image_size)
    sources = {"train": [(train_files, None)]
               + [(train_files, params.features.seed + 1000 * v) for v in range(1, plan.views)],
               "val": [(val_files, None)]}
    start = time.perf_counter()
    with io.replaced_dir(directory) as staging:
        for name, views in sources.items():
            n = len(views[0][0])
            shapes = {"pooled": ((len(views), n, plan.pooled_dim), POOLED_DTYPE)}
            if split:
                shapes["cut"] = ((len(views), n, *plan.cut_shape), plan.cut_dtype)
            with contextlib.ExitStack() as files_open:
                out = {kind: files_open.enter_context(_NpyWriter(
                    staging / f"{name}_{kind}.npy", shape, dtype))
                    for kind, (shape, dtype) in shapes.items()}
                for files, seed in views:  # view-major, as the arrays are laid out
                    images = image_dataset(files, None, 0, params.model.image_size,
                                           params.model.resize, batch,
                                           augmenter=None if seed is None
                                           else augmenter(params.augment, seed))
                    for x in images:
                        result = forward(tf.cast(x, tf.float32))
                        cut, pooled = result if split else (None, result)
                        out["pooled"].append(pooled)
                        if split:
                            out["cut"].append(cut)
        meta = {"train_files": files_digest(train_files), "val_files": files_digest(val_files),
                "image_size": params.model.image_size, "resize": params.model.resize,
                "unfreeze": params.train.unfreeze, "views": plan.views,
                "cut_layer": split[0].layers[-1].name if split else None,
                "cut_shape": list(plan.cut_shape) if split else None,
                "cut_dtype": plan.cut_dtype, "base": weights_digest(classifier.base),
                "bytes": plan.total_bytes(),
                "seconds": round(time.perf_counter() - start, 3)}
        io.write_json(staging / META, meta)
    return meta


class _NpyWriter:
    """A `.npy` file written front to back, batch by batch: written bytes go to the page
    cache, not to this process's memory (a memory map's dirty pages would count as its own,
    growing with the dataset)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0

    def __enter__(self) -> _NpyWriter:
        self.handle = open(self.path, "wb")  # noqa: SIM115 (closed by __exit__)
        np.lib.format.write_array_header_2_0(self.handle, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": self.shape})
        return self

    def append(self, batch) -> None:
        rows = np.ascontiguousarray(np.asarray(batch), dtype=self.dtype)
        self.handle.write(rows.tobytes())
        self.rows += len(rows)

    def __exit__(self, kind, *_) -> None:
        self.handle.close()
        if kind is None and self.rows != self.shape[0] * self.shape[1]:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, "
                               f"{self.shape[0] * self.shape[1]} declared")


class RowReader:
    """Rows of a (views, images, ...) `.npy` file, read by (view, image) straight from disk:
    no array in memory, and no memory map whose pages would count as the process's."""

    def __init__(self, path: Path):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(handle)
            self.offset = handle.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran order")
        self.path, self.shape, self.dtype = path, shape, dtype
        self.row_shape = shape[2:]
        self.row_bytes = int(np.prod(self.row_shape)) * dtype.itemsize
        self._fd: int | None = None

    @property
    def views(self) -> int:
        return self.shape[0]

    @property
    def images(self) -> int:
        return self.shape[1]

    def read(self, views: np.ndarray, images: np.ndarray) -> np.ndarray:
        """float32 rows for each (view, image) pair, in the order given."""
        if self._fd is None:  # opened lazily: a reader is pickled into tf.data's functions
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(images), *self.row_shape), dtype=np.float32)
        for j, (v, i) in enumerate(zip(views.tolist(), images.tolist(), strict=True)):
            at = self.offset + (v * self.images + i) * self.row_bytes
            out[j] = np.frombuffer(os.pread(self._fd, self.row_bytes, at),
                                   dtype=self.dtype).reshape(self.row_shape)
        return out


def row_dataset(reader: RowReader, onehot: np.ndarray, batch_size: int, order=None):
    """Batches of (float32 rows, labels); each epoch draws one stored view per image.

    `order`: a keras SeedGenerator to shuffle by (None: in order, view 0). The view drawn for
    an image is a function of that state and the image, so it too restarts with the epoch
    (`phases.EpochSeeds`).
    """
    import tensorflow as tf

    from imgclf.data.pipeline import epoch_order, seed_of

    n = reader.images
    labels = tf.convert_to_tensor(onehot)

    def pick(batch):  # whole batches: one read each, not one dataset element per image
        if reader.views == 1 or order is None:
            drawn = tf.zeros_like(batch)
        else:
            seed = seed_of(order) + tf.constant([1, 0], tf.int64)
            every = tf.random.stateless_uniform([n], seed, 0, reader.views, tf.int64)
            drawn = tf.gather(every, batch)
        rows = tf.numpy_function(reader.read, [drawn, batch], tf.float32, stateful=False)
        rows.set_shape((None, *reader.row_shape))
        return rows, tf.gather(labels, batch)

    ds = epoch_order(n, order).batch(batch_size).map(pick, num_parallel_calls=tf.data.AUTOTUNE,
                                                     deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclass
class Features:
    """The stored arrays, checked against the training that reads them."""

    directory: Path
    meta: dict
    top: object | None  # the base above the cut (sharing the classifier's layers), or None

    def reader(self, split: str, kind: str) -> RowReader:
        return RowReader(self.directory / f"{split}_{kind}.npy")

    @property
    def has_cut(self) -> bool:
        return self.top is not None


def read(directory: Path, params: Params, data, classifier) -> Features:
    """The features stage's arrays for this training, or UserError saying what to run."""
    from imgclf.model.network import split_base, weights_digest

    meta_path = directory / META
    if not meta_path.is_file():
        raise UserError(f"{directory} not found: run the features stage first (dvc repro "
                        "train runs it), or set features.cache to false")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    split = split_base(classifier.base, params.train.unfreeze)
    expected = {"train_files": files_digest(data.train_files),
                "val_files": files_digest(data.val_files),
                "image_size": params.model.image_size, "resize": params.model.resize,
                "views": params.features.views,
                "cut_shape": list(cut_shape(split)) if split else None,
                "base": weights_digest(classifier.base)}
    stale = [key for key, value in expected.items() if meta.get(key) != value]
    if stale:
        raise UserError(f"{directory} was made for other {', '.join(stale)} than this training "
                        "uses: run the features stage again (dvc repro runs it when its params "
                        "or data change)")
    return Features(directory, meta, split[1] if split else None)
