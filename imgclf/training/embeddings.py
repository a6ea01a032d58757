"""The trained model's own view of its training and validation images, kept for the
`selective` stage: the pooled features its head reads (penultimate features), its
probabilities (which `package` also checks the serving copies against), and the head's
weights.

From the stored arrays when there are some (the base's top and the pool run on the
activations at the cut: no pass of the base), else from the images. Written by `train`
(models/embeddings.npz) so that choosing thresholds, or another out-of-distribution score,
retrains nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf import io
from imgclf.errors import UserError


def _pooled_model(classifier, features, top):
    """What maps the stored rows (or images) to the pooled features; (model, kind)."""
    import keras

    if features is None:
        return keras.Model(classifier.model.input, classifier.pool.output), None
    if not features.has_cut:  # nothing unfrozen: the stored pooled features are the model's
        return None, "pooled"
    cut = keras.Input(top.input_shape[1:], name="cut_activations")
    return keras.Model(cut, classifier.pool(top(cut, training=False))), "cut"


def _pooled(model, kind, features, data, split: str, files, batch_size: int) -> np.ndarray:
    if kind is None:
        return model.predict(data.make_images(files, None, False, None), verbose=0)
    reader = features.reader(split, kind)
    out = []
    for start in range(0, reader.images, batch_size):
        index = np.arange(start, min(start + batch_size, reader.images))
        rows = reader.read(np.zeros_like(index), index)  # view 0: the image as it is
        out.append(rows if model is None else model.predict_on_batch(rows))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def head_weights(classifier) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The head's dense layers' kernels and biases, input to output (calibrated: the last
    one holds the temperature)."""
    dense = [layer for layer in classifier.head_layers if layer.weights]
    return ([np.asarray(layer.kernel) for layer in dense],
            [np.asarray(layer.bias) for layer in dense])


def write(classifier, data, top, batch: int, path: Path) -> None:
    """`classifier` is the calibrated model that ships; `top`: its base above the cut the
    stored activations were taken at (None when nothing is cut)."""
    model, kind = _pooled_model(classifier, data.features, top)
    train = _pooled(model, kind, data.features, data, "train", data.train_files, batch)
    val = _pooled(model, kind, data.features, data, "val", data.val_files, batch)
    head = classifier.feature_head()
    train_probs, val_probs = (head.predict(split, verbose=0) if len(split)
                              else np.zeros((0, data.num_classes), np.float32)
                              for split in (train, val))
    kernels, biases = head_weights(classifier)
    with io.replacing(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, train_features=train.astype(np.float16),
                 train_labels=data.train_labels, train_probs=train_probs.astype(np.float32),
                 val_features=val.astype(np.float32),
                 val_labels=data.val_labels, val_probs=val_probs.astype(np.float32),
                 **{f"head_kernel_{i}": k for i, k in enumerate(kernels)},
                 **{f"head_bias_{i}": b for i, b in enumerate(biases)})


def read(path: Path) -> dict:
    """The arrays `write` stored: train_features, train_labels, val_features, val_labels,
    val_probs, kernels, biases."""
    with np.load(path) as stored:
        out = {k: stored[k] for k in ("train_features", "train_labels", "val_features",
                                      "val_labels", "val_probs")}
        layers = sum(1 for k in stored.files if k.startswith("head_kernel_"))
        out["kernels"] = [stored[f"head_kernel_{i}"] for i in range(layers)]
        out["biases"] = [stored[f"head_bias_{i}"] for i in range(layers)]
    return out


def stored_answers(path: Path, images: dict[str, int]) -> dict[str, tuple[np.ndarray,
                                                                        np.ndarray]]:
    """The shipped model's probabilities and pooled features on every image of each split
    `images` names ({"val" or "train": its image count}), in manifest order, as `write`
    stored them at `path`. UserError when a split is not one row per image (the file of a
    training on other data) or the file predates the training images' probabilities."""
    answers = {}
    with np.load(path) as stored:
        for split, count in images.items():
            if f"{split}_probs" not in stored.files:
                raise UserError(f"{path} holds no probabilities of the {split} images: it "
                                "was written by an older version (dvc repro train)")
            probs, features = stored[f"{split}_probs"], stored[f"{split}_features"]
            if len(probs) != count or len(features) != count:
                raise UserError(f"{path} holds the answers on {len(probs)} {split} images, "
                                f"the {split} split has {count}: it comes from a training on "
                                f"other data (dvc repro train)")
            answers[split] = (probs, features.astype(np.float32))
    return answers
