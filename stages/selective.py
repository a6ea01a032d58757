"""DVC stage `selective`: when the served model says `unknown` or `unsure` instead of an answer.

Reads params selective and what `train` stored of the model's own features
(models/embeddings.npz). Fits every out-of-distribution score on the training split's
features, sets the `unknown` threshold so that `selective.ood_keep` of the validation images
pass and the confidence threshold so that the validation answers kept reach
`selective.target_accuracy`; writes models/selective.npz (what the registered model carries)
and reports/selective.json. No TensorFlow: changing a threshold retrains nothing and costs
seconds.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.errors import UserError, exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import SelectiveReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained = TrainReport.read()
    from imgclf.model import selective
    from imgclf.training import embeddings

    if not paths.EMBEDDINGS.is_file():
        raise UserError(f"{paths.EMBEDDINGS} not found: run the train stage (dvc repro train)")
    stored = embeddings.read(paths.EMBEDDINGS)
    chosen = params.selective
    fitted = selective.fit(stored["train_features"], stored["train_labels"],
                           stored["val_features"], stored["val_probs"], stored["val_labels"],
                           stored["kernels"], stored["biases"], chosen.ood_method, chosen.ood,
                           chosen.ood_keep, chosen.unsure, chosen.target_accuracy)
    with io.replacing(paths.SELECTIVE) as tmp:
        fitted.save(tmp)
    report = SelectiveReport(weights_digest=trained.weights_digest, ood_method=fitted.method,
                             ood_threshold=fitted.ood_threshold,
                             confidence_threshold=fitted.confidence_threshold,
                             ood_thresholds=fitted.thresholds, notes=fitted.notes)
    report.write()
    notes = fitted.notes
    unknown = (f"unknown above {fitted.ood_threshold:.4g} (keeps "
               f"{1 - notes['val_unknown_share']:.0%} of {notes['val_images']} validation "
               "images)" if fitted.ood_threshold is not None else "unknown: off")
    unsure = (f"unsure below confidence {fitted.confidence_threshold:.4f} (validation: "
              f"{notes['val_coverage']:.0%} kept at accuracy {notes['val_accuracy_kept']:.4f})"
              if fitted.confidence_threshold is not None else "unsure: off")
    print(f"selective: {fitted.method} score, {unknown}; {unsure}")
    if not notes["target_reached"]:
        print(f"warning: no confidence threshold reaches selective.target_accuracy = "
              f"{chosen.target_accuracy} on validation; the threshold of the best accuracy is "
              "used (lower the target, or turn the check off with selective.unsure: false)")


if __name__ == "__main__":
    main()
