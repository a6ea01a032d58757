"""DVC stage `evaluate`: honest numbers on the held-out test split, of the model in production.

Reads params evaluate, model (image_size, resize). The test split decides nothing (no early
stopping, no model choice). The registered version is loaded as `mlflow models serve` loads
it; each test file goes through it as a client sends it (base64 bytes): the test metrics are
those of what serves. Beside them, the Keras model's numbers and its agreement with the
served format, from package's models/keras_test_probs.npz (a TFLite-served model is
evaluated without loading Keras, as it is deployed). Writes reports/metrics.json (DVC
metrics), reports/per_class.csv, confused_pairs.csv, errors.csv (misclassified files, worst
first), plots/confusion.csv, figures/*.png (reliability.png: calibration before and after the
temperature), train_curves.png; logs them to the training run, tags the registered version
with the test metrics (what promotion compares) and writes its model card.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import RegisterReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained, registered = TrainReport.read(), RegisterReport.read()
    from imgclf.cards import model_card
    from imgclf.data.manifests import data_version, read_classes, read_manifest
    from imgclf.evaluation import (
        evaluation_lines,
        served_and_keras,
        test_results,
        training_pictures,
        write_evaluation,
    )
    from imgclf.export import reference
    from imgclf.tracking import registry, runs, store

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    uri = registry.version_uri(registered.registered_model, registered.model_version)
    with registry.served_model(uri) as served:
        probs, keras_summary, fmt = served_and_keras(
            served, files, labels, classes, params,
            reference.read(files, registered.weights_digest))
    summary, per_class, matrix, pairs, reliability = test_results(
        probs, labels, classes, trained.temperature)
    artifacts = write_evaluation({**summary, **keras_summary}, per_class, matrix, pairs,
                                 reliability, probs, files, labels, classes,
                                 params.model.image_size, params.model.resize)
    card = model_card(params, data_version(), io.read_json(paths.PREPARE_REPORT), trained,
                      {**summary, **keras_summary}, fmt)
    runs.log_evaluation(store.make_client(), registered, summary, keras_summary, fmt,
                        artifacts, card, training_pictures())
    print(evaluation_lines(uri, fmt, summary, keras_summary, pairs, params.evaluate.tta))


if __name__ == "__main__":
    main()
