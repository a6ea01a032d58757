"""DVC stage `evaluate`: honest numbers on the held-out test split, and pictures of them.

Reads params sections evaluate, model (image_size, resize). The test split is used here only:
never for early stopping or model choice. Writes reports/metrics.json (DVC metrics),
reports/per_class.csv, reports/confused_pairs.csv, reports/plots/confusion.csv (DVC confusion
plot) and reports/figures/*.png; logs them to the training run in MLflow and tags the
registered model version with the test metrics.
"""

from __future__ import annotations

import json

from imgclf import paths
from imgclf.errors import UserError, exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    if not paths.TRAIN_REPORT.is_file() or not paths.MODEL_FILE.is_file():
        raise UserError("no trained model: run the train stage first (dvc repro train)")
    from tqdm import tqdm

    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.reports import test_results, write_evaluation
    from imgclf.serving.batches import predict_files
    from imgclf.serving.runners import load_keras_file
    from imgclf.tracking import runs, store

    classes = read_classes()
    files, labels = read_manifest("test", classes)
    model = load_keras_file(paths.MODEL_FILE, paths.CLASSES_JSON, params.model.image_size,
                            params.model.resize, tta=params.evaluate.tta)
    with tqdm(total=len(files), unit="img", desc="evaluate") as bar:
        probs, _, bad = predict_files(model, files, params.evaluate.batch_size,
                                      on_batch=bar.update)
    if bad:
        raise UserError(f"{len(bad)} test image(s) could not be read (e.g. {files[bad[0][0]]}: "
                        f"{bad[0][1]}): rerun the prepare stage")
    summary, per_class, matrix, pairs = test_results(probs, labels, classes)
    artifacts = write_evaluation(summary, per_class, matrix, pairs, probs, files, labels,
                                 classes, params.model.image_size, params.model.resize)
    train_report = json.loads(paths.TRAIN_REPORT.read_text(encoding="utf-8"))
    runs.log_evaluation(store.make_client(), train_report, summary, artifacts)
    print(f"evaluate: test accuracy {summary['accuracy']:.4f}, top-5 "
          f"{summary['top5_accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, "
          f"log loss {summary['log_loss']:.4f} on {summary['n_test']} images"
          f"{' (TTA)' if params.evaluate.tta else ''}")
    if len(pairs):
        top = pairs.iloc[0]
        print(f"  most confused: {top['actual']} -> {top['predicted']} ({top['count']}x)")


if __name__ == "__main__":
    main()
