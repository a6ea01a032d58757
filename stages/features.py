"""DVC stage `features`: the frozen part of the base, run once per image and view.

Reads params sections features, model (image_size, resize, weights), train.unfreeze (where
the frozen part ends) and augment (the extra views). Writes data/features/: the pooled
features and the activations at the fine-tune cut, for train and val (see
`imgclf.features`), keeping the rows of every image it already holds under the same base,
size, cut and views: new images alone go through the base. An experiment that changes only
training params leaves this stage, and so the base's forward pass, alone.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    if not params.features.cache:
        with io.replaced_dir(paths.FEATURES_DIR) as staging:
            io.write_json(staging / "meta.json", {"cache": False})  # features.META
        print("features: features.cache is false; train runs the whole base every step")
        return
    from imgclf.model.network import build_classifier, resolve_weights

    weights = resolve_weights(params.model.weights)  # offline imagenet fails here, in seconds
    from imgclf import features
    from imgclf.data.manifests import read_classes, read_manifest, read_sha256

    classes = read_classes()
    classifier = build_classifier(params.model, len(classes), weights, seed=params.train.seed)
    meta = features.write(paths.FEATURES_DIR, classifier, params,
                          read_manifest("train", classes)[0], read_manifest("val", classes)[0],
                          {split: read_sha256(split) for split in ("train", "val")})
    print(f"features: {paths.FEATURES_DIR} in {meta['seconds']:.1f} s ({meta['computed_rows']} "
          f"image views through the base, {meta['kept_rows']} kept from the last run)")


if __name__ == "__main__":
    main()
