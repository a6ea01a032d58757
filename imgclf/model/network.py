"""InceptionResNetV2 with a classification head, built the Keras transfer-learning way.

The base is one named sub-model (`BASE_NAME`) so phases freeze and unfreeze it by name; the
head layers are named (`head_pool`, `head_dropout`, `head_dense`, `head_logits`) and shared
with `feature_head`, the small model that trains on cached base features in phase 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import keras

from imgclf.errors import UserError
from imgclf.params import ModelParams

BASE_NAME = "inception_resnet_v2"
WEIGHTS_FILE = "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
               f"inception_resnet_v2/{WEIGHTS_FILE}")
RANDOM_BASE_SEED = 0
FEATURE_DIM = 1536  # channels of InceptionResNetV2's last block (conv_7b_ac)


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(weights: str | None) -> str | None:
    """What to hand Keras for `model.weights`: None, "imagenet" or a local file path.

    Offline, `imagenet` without a cached file stops here within seconds (not after a long
    download timeout) with the file, its URL, where to put it and the alternatives.
    """
    if weights is None:
        return None
    if weights == "imagenet":
        cached = keras_cache_dir() / WEIGHTS_FILE
        if cached.is_file() or _reachable("storage.googleapis.com"):
            return "imagenet"
        raise UserError(
            f"model.weights = 'imagenet' needs {WEIGHTS_FILE}, which is not in the Keras "
            f"cache and cannot be downloaded (no network). Download it from {WEIGHTS_URL} "
            f"and put it in {cached.parent}/ (or set KERAS_HOME), or set model.weights to "
            "the path of that file, or to null for random init (offline demo and tests only)"
        )
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"model.weights = {weights!r} is not a file: use 'imagenet', the path "
                        f"of a local {WEIGHTS_FILE}, or null (random init)")
    return str(path)


def build_base(image_size: int, weights: str | None) -> keras.Model:
    """The notop base; `weights` as returned by resolve_weights."""
    try:
        base = keras.applications.InceptionResNetV2(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    except (ValueError, OSError, KeyError) as err:
        if weights in (None, "imagenet"):
            raise
        raise UserError(f"model.weights = {weights!r} could not be loaded into "
                        f"InceptionResNetV2 (notop): {err}") from None
    base.name = BASE_NAME
    return base


@dataclass
class Classifier:
    """The full model and the head layers it shares with the feature-head model."""

    model: keras.Model
    base: keras.Model
    head_layers: list[keras.layers.Layer]
    _head: keras.Model | None = None

    @property
    def pool(self) -> keras.layers.Layer:
        """The head's pooling layer: base activations -> pooled features."""
        return self.model.get_layer("head_pool")

    def head(self) -> keras.Model:
        """The head alone (one model, built once): what phase 1 changes, and so all that its
        checkpoints need to hold (kilobytes, not the base's 54M weights)."""
        if self._head is None:
            self._head = self.feature_head()
        return self._head

    def feature_head(self) -> keras.Model:
        """Pooled base features -> class probabilities, sharing the full model's head weights."""
        features = keras.Input((FEATURE_DIM,), name="features")
        x = features
        for layer in self.head_layers:
            x = layer(x)
        return keras.Model(features, x, name="feature_head")


def build_classifier(params: ModelParams, num_classes: int, weights: str | None,
                     seed: int = 0) -> Classifier:
    size = params.image_size
    inputs = keras.Input((size, size, 3), name="pixels")  # raw RGB 0-255
    # InceptionResNetV2's preprocess_input is x/127.5 - 1; a Rescaling layer does the same and
    # serialises, so the saved model takes raw pixels and loads with safe_mode=True.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_unit")(inputs)
    if weights is None:
        # A random base (tests, the offline demo) from one fixed seed, whatever train.seed
        # is: the features stage and train must build the same frozen layers.
        keras.utils.set_random_seed(RANDOM_BASE_SEED)
    base = build_base(size, weights)
    keras.utils.set_random_seed(seed)  # the head's initial weights follow train.seed
    # training=False keeps BatchNorm in inference mode even when the base is unfrozen, so
    # fine-tuning does not wreck the pretrained statistics (Keras transfer-learning guide).
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    head_layers: list[keras.layers.Layer] = [
        keras.layers.Dropout(params.dropout, seed=seed, name="head_dropout")]
    if params.dense_units:
        head_layers.append(keras.layers.Dense(params.dense_units, activation="relu",
                                              name="head_dense"))
    # float32 output even under a mixed-precision policy: softmax in bf16 loses resolution.
    head_layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                          name="head_logits"))
    for layer in head_layers:
        x = layer(x)
    model = keras.Model(inputs, x, name="imgclf")
    return Classifier(model=model, base=base, head_layers=head_layers)


def freeze_base(base: keras.Model) -> None:
    base.trainable = False


def weights_digest(model: keras.Model) -> str:
    """A short hash of every weight: replicas that trained in sync print the same one, and
    the features stage and train know they run the same frozen base."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _layers(base: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]


def first_unfrozen(base: keras.Model, unfreeze: int | str) -> int:
    """The index (in the base's layers, inputs left out) where fine-tuning starts: layer
    `unfreeze` (a name) or the top `unfreeze` layers; len(layers) when nothing unfreezes."""
    layers = _layers(base)
    if isinstance(unfreeze, str):
        names = [layer.name for layer in layers]
        if unfreeze not in names:
            hint = ", ".join(n for n in names if n.startswith(("block8", "conv_7b")))[-200:]
            raise UserError(f"train.unfreeze = {unfreeze!r} is not a layer of "
                            f"InceptionResNetV2 (top layers include: ...{hint})")
        return names.index(unfreeze)
    return max(0, len(layers) - unfreeze)


def unfreeze_top(base: keras.Model, unfreeze: int | str) -> int:
    """Unfreeze the base from layer `unfreeze` (a name) or its top `unfreeze` layers.

    BatchNormalization layers stay frozen. Returns the number of trainable weight tensors.
    """
    start = first_unfrozen(base, unfreeze)
    base.trainable = True
    for i, layer in enumerate(_layers(base)):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.trainable_weights)


def _crossing(layers: list[keras.layers.Layer], base_input, k: int) -> list:
    """The tensors made below layer k (or the base's input) that layers from k on read."""
    made = {id(base_input): base_input}
    made.update({id(layer.output): layer.output for layer in layers[:k]})
    read = {}
    for layer in layers[k:]:
        # Keras keeps each call of a layer as a node holding its input tensors: the graph's
        # edges, which no public API lists.
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                if id(tensor) in made:
                    read[id(tensor)] = tensor
    return list(read.values())


def split_base(base: keras.Model, unfreeze: int | str) -> tuple[keras.Model, keras.Model] | None:
    """The base as `bottom` (its input -> the activations at the fine-tune cut) and `top`
    (the cut -> its output), sharing the base's layers; None when nothing unfreezes.

    The cut is the one tensor through which everything below the first unfrozen layer
    reaches it: for `block8_9_ac` the output of block8_9 (8x8x2080 at 299 px). Where
    several tensors cross (a name inside an Inception block, whose branches and residual
    reach past it), the cut moves down to the block's input; the frozen layers above it
    then run in `top`, frozen, as in the whole model.
    """
    layers = _layers(base)
    start = first_unfrozen(base, unfreeze)
    if start >= len(layers):
        return None
    for k in range(start, -1, -1):
        crossing = _crossing(layers, base.input, k)
        if len(crossing) == 1:
            cut = crossing[0]
            break
    if cut is base.input:
        raise UserError(f"train.unfreeze = {unfreeze!r} unfreezes the whole base: there is no "
                        "frozen part to cache; set features.cache to false")
    return keras.Model(base.input, cut, name="base_bottom"), keras.Model(cut, base.output,
                                                                        name="base_top")
