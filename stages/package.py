"""DVC stage `package`: the trained model's deployable files, written once.

Reads params model (image_size, resize), prepare.max_pixels. Writes models/saved_model/
(image bytes or pixels in: what every TFLite copy is converted from, and what export ships),
models/model_dynamic.tflite (the serving copy, with its agreement with Keras on validation
images), models/keras_test_probs.npz (the Keras model's test-split probabilities and pooled
features, what evaluate and export compare with instead of running Keras again) and
reports/package.json. Every format answers the probabilities and the pooled features from
one forward pass (what the selective scores read).
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import PackageReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained = TrainReport.read()
    import keras

    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.export import formats, reference

    model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
    size, resize = params.model.image_size, params.model.resize
    with io.replaced_dir(paths.SAVED_MODEL_DIR) as staging:
        # The export's traced graph runs the serving check and the test split: one trace.
        forward = formats.write_saved_model(model, read_classes(), size, resize, staging)
    with io.replacing(paths.SERVING_COPY) as tmp:
        agreement, checked = formats.serving_copy(params, lambda x: forward(x)[0],
                                                  paths.SAVED_MODEL_DIR, tmp)
    reference.write(forward, read_manifest("test", read_classes())[0], size, resize,
                    params.prepare.max_pixels, trained.weights_digest)
    report = PackageReport(weights_digest=trained.weights_digest,
                           serving_variant=formats.SERVING_VARIANT,
                           serving_top1_agreement=agreement, serving_checked_images=checked,
                           serving_agrees=agreement >= formats.QUANTISED_MIN_AGREEMENT)
    report.write()
    print(f"package: {paths.SAVED_MODEL_DIR}, {paths.SERVING_COPY} (top-1 agreement with "
          f"Keras {agreement:.1%} on {checked} validation images), {paths.KERAS_TEST_PROBS}")


if __name__ == "__main__":
    main()
