"""The frozen part of the base, run once per image: what the `features` stage stores and
`train` reads.

With BatchNorm frozen and the base called in inference mode, what the frozen layers compute
is a pure function of the image (and its augmented view). So the stage runs them once per
image and view, and stores two arrays of rows:

- `pooled`: the pooled output of the whole base (1536 floats), what phase 1's head trains on;
- `cut`: the activations at the fine-tune cut (`network.split_base`), what phase 2's unfrozen
  top and head train on: a phase-2 epoch costs the top block, not the base.

A row is keyed by the image's content (its sha256 in the manifest) and its view; `meta.json`
records what every row was made with (the base's weights digest, the image size and resize
mode, the cut, the views' augmentation). When the data changes, the stage keeps the rows of
the images it has already seen under that key and runs the base on the new ones only: a
relabel, a move between splits or a deletion costs no forward pass. The store holds the rows
today's manifests reference and nothing else (`train_rows.npy`, `val_rows.npy`: the row of
each (view, image) of a split). DVC keeps the folder in place while the stage reruns
(`persist: true` in dvc.yaml).

Each array is a `.npy` file; training reads the rows of each batch from disk (`os.pread`),
so memory does not grow with the dataset. `train` refuses a store made for other data,
another cut or another base.
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


FORMAT = 2  # rows keyed by image content and view, with a row index per split
ROW_KINDS = ("pooled", "cut")


def row_key(params: Params, classifier, split) -> dict:
    """What a stored row was computed with, beside its image and view: equal keys, equal
    rows (up to the round-off of the batch it ran in)."""
    from imgclf.model.network import weights_digest

    return {"base": weights_digest(classifier.base), "image_size": params.model.image_size,
            "resize": params.model.resize, "cut_layer": split[0].layers[-1].name if split
            else None, "cut_shape": list(cut_shape(split)) if split else None,
            "cut_dtype": params.features.dtype,
            # The code that decodes, resizes, augments and runs an image: an edit to it is
            # another row (DVC reruns the stage on it; nothing stored is kept).
            "code": _code_digest()}


def views_key(params: Params) -> dict:
    """What the augmented views (1 and up) were drawn with, beyond `row_key`: another
    recipe drops them and keeps view 0, the image as it is."""
    return {"augment": params.augment.model_dump(exclude={"seed", "preview_images",
                                                          "preview_views"}),
            "seed": params.features.seed}


ROW_CODE = ("data/images.py", "data/pipeline.py", "model/network.py",
            "model/augmentation.py")


def _code_digest() -> str:
    import hashlib

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for rel in ROW_CODE:
        digest.update(rel.encode())
        digest.update((package / rel).read_bytes())
    return digest.hexdigest()[:16]


def file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _Previous:
    """The rows a store already holds under `key`, by (sha256, view); empty when there is
    no store, or one made under another key or format (then every row is computed)."""

    def __init__(self, directory: Path, key: dict, views: dict):
        self.rows: dict[tuple[str, int], int] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.reason = "no stored features"
        meta_path = directory / META
        if not meta_path.is_file():
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                self.reason = "no stored features in this layout"
                return
            if meta.get("key") != key:
                self.reason = "the stored ones were made with another base, size, cut or views"
                return
            with np.load(directory / "rows.npz") as ids:
                shas, ids_views = ids["sha256"].tolist(), ids["view"].tolist()
            self.arrays = {kind: np.load(directory / f"{kind}.npy", mmap_mode="r")
                           for kind in ROW_KINDS if (directory / f"{kind}.npy").is_file()}
        except (OSError, ValueError, KeyError) as err:
            self.reason = f"unreadable stored features ({type(err).__name__})"
            self.arrays = {}
            return
        if any(len(a) != len(shas) for a in self.arrays.values()):
            self.reason = "stored features with rows missing"
            self.arrays = {}
            return
        same_views = meta.get("views_key") == views
        self.rows = {(sha, int(view)): i for i, (sha, view) in enumerate(zip(shas, ids_views,
                                                                            strict=True))
                     if view == 0 or same_views}


def write(directory: Path, classifier, params: Params, train_files: list[str],
          val_files: list[str], shas: dict[str, list[str]] | None = None) -> dict:
    """Run the frozen base over every (image, view) of train (every view) and val (view 0)
    that `directory` does not already hold under this key, and store the rows today's
    splits reference, replaced in one rename; returns the meta it records. `shas`: each
    split's sha256s in file order (the manifests'; computed from the files when None)."""
    import tensorflow as tf

    from imgclf.data.pipeline import image_dataset
    from imgclf.model.augmentation import augmenter
    from imgclf.model.network import split_base

    files = {"train": train_files, "val": val_files}
    shas = shas or {name: [file_sha256(f) for f in fs] for name, fs in files.items()}
    split = split_base(classifier.base, params.train.unfreeze)
    plan = plan_for(params, split, len(train_files), len(val_files))
    check_budget(plan, params)
    key = row_key(params, classifier, split)
    # Every (sha, view) today's splits reference, once each, and where to read its image.
    wanted: dict[tuple[str, int], str] = {}
    for view in range(plan.views):
        for sha, path in zip(shas["train"], train_files, strict=True):
            wanted.setdefault((sha, view), path)
    for sha, path in zip(shas["val"], val_files, strict=True):
        wanted.setdefault((sha, 0), path)
    previous = _Previous(directory, key, views_key(params))
    kept = [k for k in wanted if k in previous.rows]
    new = [k for k in wanted if k not in previous.rows]
    order = kept + new  # the store's rows: kept ones copied first, then the computed ones
    kinds = {"pooled": ((plan.pooled_dim,), POOLED_DTYPE)}
    if split:
        kinds["cut"] = (plan.cut_shape, plan.cut_dtype)
    print(f"features: storing {plan.bytes_per_row() * len(order) / 1e6:,.1f} MB, "
          f"{len(order):,} rows: {len(new):,} through the base, {len(kept):,} kept"
          + ("" if kept else f" ({previous.reason})") + "; "
          + (f"activations below {params.train.unfreeze} "
             f"{'x'.join(map(str, plan.cut_shape))} {plan.cut_dtype} and " if split else "")
          + f"pooled {plan.pooled_dim} {POOLED_DTYPE}")
    extractor = _extractor(classifier, split)
    spec = tf.TensorSpec((None, *extractor.input_shape[1:]), tf.float32)
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    batch = extraction_batch(params.model.image_size)
    start = time.perf_counter()
    with io.replaced_dir(directory) as staging:
        with contextlib.ExitStack() as files_open:
            out = {kind: files_open.enter_context(_NpyWriter(
                staging / f"{kind}.npy", (len(order), *shape), dtype))
                for kind, (shape, dtype) in kinds.items()}
            old_rows = np.array([previous.rows[k] for k in kept], dtype=np.int64)
            for at in range(0, len(old_rows), 256):  # a copy, not a forward pass
                for kind, writer in out.items():
                    writer.append(previous.arrays[kind][old_rows[at:at + 256]])
            for view in range(plan.views):
                todo = [wanted[k] for k in new if k[1] == view]
                if not todo:
                    continue
                seed = None if view == 0 else params.features.seed + 1000 * view
                images = image_dataset(todo, None, 0, params.model.image_size,
                                       params.model.resize, batch,
                                       augmenter=None if seed is None
                                       else augmenter(params.augment, seed))
                for x in images:
                    result = forward(tf.cast(x, tf.float32))
                    cut, pooled = result if split else (None, result)
                    out["pooled"].append(pooled)
                    if split:
                        out["cut"].append(cut)
        # `new` was computed view by view: its rows are in that order, not in `new`'s.
        computed = [k for view in range(plan.views) for k in new if k[1] == view]
        row_of = {k: i for i, k in enumerate(kept + computed)}
        np.savez(staging / "rows.npz", sha256=np.array([k[0] for k in kept + computed]),
                 view=np.array([k[1] for k in kept + computed], dtype=np.int32))
        np.save(staging / "train_rows.npy", np.array(
            [[row_of[(sha, v)] for sha in shas["train"]] for v in range(plan.views)],
            dtype=np.int64).reshape(plan.views, len(train_files)))
        np.save(staging / "val_rows.npy", np.array(
            [[row_of[(sha, 0)] for sha in shas["val"]]], dtype=np.int64).reshape(
            1, len(val_files)))
        meta = {"format": FORMAT, "key": key, "views_key": views_key(params),
                "train_files": files_digest(train_files), "val_files": files_digest(val_files),
                "image_size": params.model.image_size, "resize": params.model.resize,
                "unfreeze": params.train.unfreeze, "views": plan.views,
                "cut_layer": key["cut_layer"], "cut_shape": key["cut_shape"],
                "cut_dtype": plan.cut_dtype, "base": key["base"],
                "rows": len(order), "computed_rows": len(new), "kept_rows": len(kept),
                "bytes": plan.bytes_per_row() * len(order),
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
        if kind is None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, "
                               f"{self.shape[0]} declared")


class RowReader:
    """Rows of a `.npy` file read by (view, image) straight from disk: no array in memory,
    and no memory map whose pages would count as the process's. `index` (views, images)
    names the row of each; without it the file itself is laid out (views, images, ...)."""

    def __init__(self, path: Path, index: np.ndarray | None = None):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(handle)
            self.offset = handle.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran order")
        if index is None:
            index = np.arange(shape[0] * shape[1]).reshape(shape[0], shape[1])
            shape = (shape[0] * shape[1], *shape[2:])
        self.path, self.dtype, self.index = path, dtype, np.asarray(index, dtype=np.int64)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * dtype.itemsize
        self._fd: int | None = None

    @property
    def views(self) -> int:
        return self.index.shape[0]

    @property
    def images(self) -> int:
        return self.index.shape[1]

    def read(self, views: np.ndarray, images: np.ndarray) -> np.ndarray:
        """float32 rows for each (view, image) pair, in the order given."""
        if self._fd is None:  # opened lazily: a reader is pickled into tf.data's functions
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(images), *self.row_shape), dtype=np.float32)
        rows = self.index[np.asarray(views, np.int64), np.asarray(images, np.int64)]
        for j, row in enumerate(rows.tolist()):
            at = self.offset + row * self.row_bytes
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

    from imgclf.data.pipeline import epoch_order, seed_of, without_autotune

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
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


@dataclass
class Features:
    """The stored arrays, checked against the training that reads them."""

    directory: Path
    meta: dict
    top: object | None  # the base above the cut (sharing the classifier's layers), or None

    def reader(self, split: str, kind: str) -> RowReader:
        return RowReader(self.directory / f"{kind}.npy",
                         np.load(self.directory / f"{split}_rows.npy"))

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
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory} was stored in an older layout: run the features stage "
                        "again (dvc repro features)")
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
