"""DVC stage `package`: the trained model's deployable files, written once.

Reads params package, model (image_size, resize), prepare.max_pixels, and train's model and
its answers on the validation and training images (models/embeddings.npz). Writes
models/saved_model/ (what every other copy is converted from and export ships; checked as
loaded back, else the stage fails), the serving candidates (models/model_dynamic.tflite,
models/openvino/ as package.openvino names), each timed here and checked against those
answers fastest first until one agrees, models/keras_test_probs.npz (Keras's test-split
answers: evaluate and export compare with them) and reports/package.json (docs/serving.md).
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
    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.training import embeddings

    classes = read_classes()
    test_files = read_manifest("test", classes)[0]
    answers = embeddings.stored_answers(paths.EMBEDDINGS, {
        split: len(read_manifest(split, classes)[0]) for split in ("val", "train")})
    from imgclf.export import formats, reference  # TensorFlow loads in formats.package

    size, resize = params.model.image_size, params.model.resize
    # The test split's reference runs with the SavedModel's traced graph while the OpenVINO
    # copies convert in their own process.
    candidates, saved_model_check = formats.package(
        params, classes, answers,
        meanwhile=lambda forward: reference.write(forward, test_files, size, resize,
                                                  params.prepare.max_pixels,
                                                  trained.weights_digest))
    PackageReport(weights_digest=trained.weights_digest, candidates=candidates,
                  saved_model=saved_model_check).write()
    print(formats.package_summary(saved_model_check, candidates))


if __name__ == "__main__":
    main()
