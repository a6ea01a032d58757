"""DVC stage `evaluate`: honest numbers on the held-out test split, of the model in production.

Reads params evaluate (with `ood_dir`: a folder of images of none of the classes), model
(image_size, resize). The test split decides nothing (no early
stopping, no model choice). The registered version is loaded as `mlflow models serve` loads
it; each test file goes through it as a client sends it (base64 bytes): the test metrics are
those of what serves. Beside them, the Keras model's numbers and its agreement with the
served format, from package's models/keras_test_probs.npz (a TFLite-served model is
evaluated without loading Keras, as it is deployed). Writes reports/metrics.json (DVC
metrics), reports/per_class.csv, confused_pairs.csv, errors.csv (misclassified files, worst
first), plots/confusion.csv, figures/*.png (reliability.png: calibration before and after the
temperature; risk_coverage.png and ood_scores.png: the status per image), train_curves.png,
plots/risk_coverage.csv, ood_methods.csv (every out-of-distribution score side by side);
logs them to the training run, tags the registered version
with the test metrics (what promotion compares) and writes its model card.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import RegisterReport, SelectiveReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained, registered, chosen = TrainReport.read(), RegisterReport.read(), SelectiveReport.read()
    from imgclf.cards import model_card
    from imgclf.data.manifests import data_version, read_classes, read_manifest
    from imgclf.evaluation import (
        evaluation_lines,
        selective_lines,
        selective_results,
        served_and_keras,
        served_ood,
        test_results,
        training_pictures,
        write_evaluation,
        write_selective,
    )
    from imgclf.export import reference
    from imgclf.model.selective import Selective
    from imgclf.tracking import registry, runs, store

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    keras_probs, keras_features = reference.read(files, registered.weights_digest,
                                                 with_features=True)
    uri = registry.version_uri(registered.registered_model, registered.model_version)
    with registry.served_model(uri) as served:
        answers, keras_summary, fmt = served_and_keras(served, files, labels, classes,
                                                       params, keras_probs)
        ood = (served_ood(served, params.evaluate.ood_dir, len(classes),
                          params.evaluate.batch_size) if params.evaluate.ood_dir else None)
    probs = answers.probs
    summary, per_class, matrix, pairs, reliability = test_results(
        probs, labels, classes, trained.temperature)
    selective = Selective.load(paths.SELECTIVE)
    flagged, methods, curve, figures = selective_results(answers, labels, selective,
                                                         keras_probs, keras_features, ood)
    summary.update(flagged)
    artifacts = write_evaluation({**summary, **keras_summary}, per_class, matrix, pairs,
                                 reliability, probs, files, labels, classes,
                                 params.model.image_size, params.model.resize)
    artifacts += write_selective(methods, curve, figures)
    card = model_card(params, data_version(), io.read_json(paths.PREPARE_REPORT), trained,
                      {**summary, **keras_summary}, fmt, chosen)
    runs.log_evaluation(store.make_client(), registered, summary, keras_summary, fmt,
                        artifacts, card, training_pictures())
    print(evaluation_lines(uri, fmt, summary, keras_summary, pairs, params.evaluate.tta))
    print(selective_lines(summary, selective))


if __name__ == "__main__":
    main()
