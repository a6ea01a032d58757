"""DVC stage `augment_preview`: a seeded picture of what training augmentation does.

Reads params sections augment, model. Writes reports/augment_preview.png: a few training
images (rows, one per class while classes last), the original then augmented views.
"""

from __future__ import annotations

import numpy as np

from stages import atomic, paths
from stages.augment import augmenter
from stages.errors import exits_cleanly
from stages.images import load_pixels
from stages.inputs import read_classes, read_manifest
from stages.params import Params, load_params


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


@exits_cleanly
def main() -> None:
    params = load_params()
    import keras

    keras.utils.set_random_seed(params.augment.seed)
    classes = read_classes()
    files, labels = read_manifest("train", classes)
    from stages.plots import augment_grid

    atomic.write_bytes(paths.AUGMENT_PREVIEW,
                       augment_grid(preview_rows(params, files, labels, classes)))
    print(f"augment_preview: wrote {paths.AUGMENT_PREVIEW}")


if __name__ == "__main__":
    main()
