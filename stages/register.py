"""DVC stage `register`: the trained model logged to its MLflow run and registered.

Reads params sections mlflow (model_name, serving_format), model (image_size, resize),
prepare.max_pixels. Writes models/saved_model/ (the model's SavedModel: image bytes or
pixels in; what the TFLite copies are converted from and what export ships) and
models/keras_test_probs.npz (the Keras model's test-split probabilities, run here once:
evaluate and export compare with them instead of loading the model again). Logs
models/model.keras as an MLflow pyfunc over image files, with the serving copy it computes
with (`mlflow.serving_format: auto`: a dynamic-range TFLite copy checked against Keras on
validation images), registers it as a new version of
`mlflow.model_name` with its model card, and writes reports/register.json (what evaluate and
export read). Its own stage so that renaming the model, the serving format or the serving
code registers again without retraining; a rerun with nothing changed registers nothing.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import UserError, exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    if not paths.MODEL_FILE.is_file() or not paths.TRAIN_REPORT.is_file():
        raise UserError("no trained model: run the train stage first (dvc repro train)")
    import keras

    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.model import reference
    from imgclf.model.formats import write_saved_model
    from imgclf.serving.runners import keras_predictor
    from imgclf.tracking import store
    from imgclf.tracking.registration import register

    store.check_reachable()
    client = store.make_client()
    model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
    classes, train_report = read_classes(), io.read_json(paths.TRAIN_REPORT)
    # Written here, once: the serving copy is converted from it and export ships it.
    with io.replaced_dir(paths.SAVED_MODEL_DIR) as staging:
        write_saved_model(model, classes, params.model.image_size, params.model.resize,
                          staging)
    keras_fn = keras_predictor(model)  # traced once: the serving check and the test split
    report = register(client, params, train_report, keras_fn, paths.SAVED_MODEL_DIR)
    reference.write(keras_fn, read_manifest("test", classes)[0], params.model.image_size,
                    params.model.resize, params.prepare.max_pixels,
                    train_report["weights_digest"])
    # The model the stored test probabilities belong to, for evaluate and export to check.
    io.write_json(paths.REGISTER_REPORT, {**report,
                                          "weights_digest": train_report["weights_digest"]})
    print(f"register: {report['model_uri']} is {report['registered_model']} version "
          f"{report['model_version']} (serving with {report['serving_format']})")


if __name__ == "__main__":
    main()
