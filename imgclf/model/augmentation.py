"""Training-time augmentation, defined once: used by the input pipeline and by the preview."""

from __future__ import annotations

import keras
import numpy as np

from imgclf.data.images import load_pixels
from imgclf.params import AugmentParams, Params


def augmentation_layers(params: AugmentParams, seed: int) -> list[keras.layers.Layer]:
    """Keras preprocessing layers for the `augment` params; a factor of 0 leaves a layer out.

    All of them work on raw 0-255 pixels, before the model's own scaling.
    """
    layers: list[keras.layers.Layer] = []
    if params.flip != "none":
        layers.append(keras.layers.RandomFlip(params.flip, seed=seed, name="aug_flip"))
    if params.rotation > 0:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="reflect",
                                                  seed=seed + 1, name="aug_rotation"))
    if params.zoom > 0:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="reflect",
                                              seed=seed + 2, name="aug_zoom"))
    if params.translation > 0:
        layers.append(keras.layers.RandomTranslation(params.translation, params.translation,
                                                     fill_mode="reflect", seed=seed + 3,
                                                     name="aug_translation"))
    if params.contrast > 0:
        layers.append(keras.layers.RandomContrast(params.contrast, value_range=(0, 255),
                                                  seed=seed + 4, name="aug_contrast"))
    if params.brightness > 0:
        layers.append(keras.layers.RandomBrightness(params.brightness, value_range=(0, 255),
                                                    seed=seed + 5, name="aug_brightness"))
    return layers


def augmenter(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """One callable applying every augmentation, or None when all are off."""
    layers = augmentation_layers(params, seed)
    return keras.Sequential(layers, name="augment") if layers else None


def pick_images(files: list[str], labels: np.ndarray, count: int, seed: int) -> list[int]:
    """Seeded choice of `count` images, spread over as many classes as possible."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    picked, seen = [], set()
    for i in order:  # one per class first
        if labels[i] not in seen:
            picked.append(int(i))
            seen.add(labels[i])
        if len(picked) == count:
            return picked
    rest = [int(i) for i in order if int(i) not in picked]
    return picked + rest[: count - len(picked)]


def preview_rows(params: Params, files, labels, classes) -> list[tuple[str, list[np.ndarray]]]:
    aug = params.augment
    size, resize = params.model.image_size, params.model.resize
    layers = augmenter(aug, aug.seed)
    rows = []
    for i in pick_images(files, labels, aug.preview_images, aug.seed):
        original = load_pixels(files[i], size, resize)
        views = [original]
        if layers is not None:
            batch = np.repeat(original[None].astype(np.float32), aug.preview_views, axis=0)
            views += list(np.asarray(layers(batch, training=True)))
        rows.append((classes[labels[i]], views))
    return rows
