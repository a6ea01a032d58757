"""The training input pipeline: image files -> tf.data batches.

Images are decoded by the same Python code that `prepare` validated them with (EXIF
rotation, first GIF frame, RGB rules), inside `tf.numpy_function` so decoding runs in
parallel threads (Pillow releases the GIL while decoding) and batches stream: the dataset is
never loaded whole into memory.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from imgclf.data.images import load_pixels


def _loader(files: list[str], image_size: int, resize: str):
    files_t = tf.constant(files)

    def load(index: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(
            lambda p: load_pixels(p.decode("utf-8"), image_size, resize),
            [tf.gather(files_t, index)], tf.uint8, stateful=False)
        image.set_shape((image_size, image_size, 3))
        return image

    return load


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning model off (its parallel maps then run one call per
    core, and prefetching still grows its buffer as it needs). With the model on, deleting
    an iterator waits for the model's optimisation thread, which wakes only when its current
    period ends: a pass over the data that ends before (a Keras `predict` or epoch of known
    length, a loop over a dataset) can then sit idle for seconds, and on a two-core machine
    that idle wait was as long as the pass itself."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def seed_of(generator) -> tf.Tensor:
    """A SeedGenerator's current state as a stateless-op seed, read when the graph runs."""
    return tf.cast(tf.convert_to_tensor(generator.state.value), tf.int64)


def epoch_order(n: int, generator=None) -> tf.data.Dataset:
    """The indices 0..n-1, shuffled by `generator`'s state as it is when an epoch's iteration
    starts (in order when None); each epoch moves the state on by one draw.

    Not `Dataset.shuffle(reshuffle_each_iteration=True)`: its per-epoch seeds live in the
    process, so a training resumed at epoch k would replay epoch 0's order. Here the order is
    a function of the state, which `training.EpochSeeds` sets from the epoch number.
    """
    if generator is None:
        return tf.data.Dataset.range(n)
    indices = tf.range(n, dtype=tf.int64)

    def permuted(_):
        # next(): the state moves on, so epochs differ even when nothing sets it per epoch.
        seed = tf.cast(tf.convert_to_tensor(generator.next()), tf.int64)
        return tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(indices, seed=seed))

    ds = tf.data.Dataset.from_tensors(0).flat_map(permuted)
    # Known length: Keras then counts steps from the start (no "ran out of data" warning).
    return ds.apply(tf.data.experimental.assert_cardinality(n))


def image_dataset(
    files: list[str],
    labels: np.ndarray | None,
    num_classes: int,
    image_size: int,
    resize: str,
    batch_size: int,
    order=None,
    augmenter=None,
) -> tf.data.Dataset:
    """Batches of (float32 pixels 0-255, one-hot labels), or pixels alone when labels is None.

    `order`: a keras SeedGenerator to shuffle by (see `epoch_order`), None for file order.
    Shuffling happens on indices (cheap) before decoding; augmentation, training only, runs
    on whole batches after decoding.
    """
    ds = epoch_order(len(files), order)
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
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))
