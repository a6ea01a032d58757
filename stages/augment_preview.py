"""DVC stage `augment_preview`: a seeded picture of what training augmentation does.

Reads params sections augment, model. Writes reports/augment_preview.png: a few training
images (rows, one per class while classes last), the original then augmented views.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.data.manifests import read_classes, read_manifest
from imgclf.errors import exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    import keras

    from imgclf.model.augmentation import preview_rows
    from imgclf.plots import augment_grid

    keras.utils.set_random_seed(params.augment.seed)
    classes = read_classes()
    files, labels = read_manifest("train", classes)
    io.write_bytes(paths.AUGMENT_PREVIEW,
                   augment_grid(preview_rows(params, files, labels, classes)))
    print(f"augment_preview: wrote {paths.AUGMENT_PREVIEW}")


if __name__ == "__main__":
    main()
