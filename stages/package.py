"""DVC stage `package`: the trained model's deployable files, written once.

Reads params package, model (image_size, resize), prepare.max_pixels. Writes
models/saved_model/ (image bytes or pixels in: what every other copy is converted from, and
what export ships; loaded back and checked against Keras on validation images: its pixels
signature exact, its image-bytes signature the same top-1 on >= 99% of those that are no
close call, else the stage fails), the serving candidates register chooses from, each with
its agreement with Keras on validation images: models/model_dynamic.tflite and
models/openvino/ (float, int8, as package.openvino names), models/keras_test_probs.npz (the
Keras model's test-split probabilities and pooled features, what evaluate and export compare
with instead of running Keras again) and reports/package.json. Every format answers the
probabilities and the pooled features from one forward pass (what the selective scores read).
"""

from __future__ import annotations

from imgclf import paths
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
    test_files = read_manifest("test", read_classes())[0]
    # Every candidate checked against the model's traced graph (the SavedModel's): the
    # Keras model's answers. The test split's reference runs with the same graph while the
    # OpenVINO copies convert in their own process.
    candidates, saved_model_check = formats.package(
        params, model, read_classes(),
        meanwhile=lambda forward: reference.write(forward, test_files, size, resize,
                                                  params.prepare.max_pixels,
                                                  trained.weights_digest))
    PackageReport(weights_digest=trained.weights_digest, candidates=candidates,
                  saved_model=saved_model_check).write()
    print(f"package: {paths.SAVED_MODEL_DIR} (as loaded back: Keras's answers, max difference "
          f"{saved_model_check['max_abs_diff']:.1e}; its image-bytes signature agrees on "
          f"{saved_model_check['bytes_signature_top1_agreement']:.1%} of "
          f"{saved_model_check['bytes_signature_images_counted']} validation images), "
          f"{paths.KERAS_TEST_PROBS}, serving candidates (against Keras on validation images: "
          "decided top-1 agreement, smallest cosine of the pooled features):")
    for fmt, c in candidates.items():
        gate = "" if c["agrees"] else "  (below a gate: auto never serves it)"
        engine = f"  computes in {c['precision']}" if c["precision"] else ""
        print(f"  {fmt:<15}{c['size_mb']:>8.1f} MB  {c['top1_agreement']:.1%} of "
              f"{c['checked_images']}  cosine {c['features_min_cosine']:.5f}{engine}{gate}")


if __name__ == "__main__":
    main()
