"""DVC stage `evaluate`: honest numbers on the held-out test split, of the model in production.

Reads params evaluate (`ood_dir`: images of none of the classes), model. The test split
decides nothing. The registered version is loaded as `mlflow models serve` loads it and
sent each test file as a client sends it: the test metrics, statuses included, are those of
what serves; beside them the Keras model's, from package's models/keras_test_probs.npz.
Writes reports/metrics.json, per_class.csv, confused_pairs.csv, errors.csv, ood_methods.csv,
plots/*.csv, figures/*.png, train_curves.png; logs them to the training run, tags the
version with the test metrics (what promotion compares) and writes its model card.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import RegisterReport, SelectiveReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained, registered = TrainReport.read(), RegisterReport.read()
    chosen = SelectiveReport.read()
    from imgclf import evaluation as ev
    from imgclf.cards import model_card
    from imgclf.data.manifests import data_version, read_classes, read_manifest
    from imgclf.export import reference
    from imgclf.tracking import registry, runs, store

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    keras_probs, keras_features = reference.read(files, registered.weights_digest,
                                                 with_features=True)
    uri = registry.version_uri(registered.registered_model, registered.model_version)
    with registry.served_model(uri) as served:
        answers, keras_summary, fmt = ev.served_and_keras(served, files, labels, classes,
                                                          params, keras_probs)
        ood = (ev.served_ood(served, params.evaluate.ood_dir, len(classes),
                             params.evaluate.batch_size) if params.evaluate.ood_dir else None)
        selective = served.unwrap_python_model().selective  # what the version carries
    summary, per_class, matrix, pairs, reliability = ev.test_results(
        answers.probs, labels, classes, trained.temperature)
    flagged, flag_artifacts, flag_lines = ev.evaluate_selective(selective, answers, labels,
                                                                keras_probs, keras_features,
                                                                ood)
    summary.update(flagged)
    artifacts = ev.write_evaluation({**summary, **keras_summary}, per_class, matrix, pairs,
                                    reliability, answers.probs, files, labels, classes,
                                    params.model.image_size, params.model.resize)
    card = model_card(params, data_version(), io.read_json(paths.PREPARE_REPORT), trained,
                      {**summary, **keras_summary}, fmt, chosen, registered.serving_reason)
    runs.log_evaluation(store.make_client(), registered, summary, keras_summary, fmt,
                        artifacts + flag_artifacts, card, ev.training_pictures())
    print(ev.evaluation_lines(uri, fmt, summary, keras_summary, pairs, params.evaluate.tta))
    print(flag_lines)


if __name__ == "__main__":
    main()
