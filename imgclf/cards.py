"""The model card of a registered version: what the pipeline knows about the model, written
as Markdown for the version's page in the MLflow UI (its description) and `imgclf models
--version N`. A pure function of the reports: no model, no MLflow."""

from __future__ import annotations

from imgclf.params import Params
from imgclf.stage_reports import SelectiveReport, TrainReport

# What the card shows of params: the settings that decide what the model is.
CARD_PARAMS = ("model.image_size", "model.weights", "model.resize", "train.head_epochs",
               "train.finetune_epochs", "train.head_lr", "train.finetune_lr", "train.unfreeze",
               "train.optimizer", "train.lr_schedule", "train.batch_size", "train.calibrate")


def _yaml(value) -> str:
    """A param as params.yaml writes it (null, true), not as Python prints it (None, True)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _selective_section(chosen: SelectiveReport, evaluation: dict | None) -> list[str]:
    notes = chosen.notes
    lines = ["", "## Status per image: `ok`, `unsure`, `unknown`"]
    if chosen.ood_threshold is None:
        lines.append("- `unknown`: off (`selective.ood: false`)")
    else:
        lines.append(f"- `unknown` when the `{chosen.ood_method}` out-of-distribution score "
                     f"(on the model's own features, fitted on {notes['train_images']} "
                     f"training images) is above {chosen.ood_threshold:.6g}: the threshold "
                     f"that keeps {notes['ood_keep']:.0%} of the {notes['val_images']} "
                     "validation images")
    if chosen.confidence_threshold is None:
        lines.append("- `unsure`: off (`selective.unsure: false`)")
    else:
        reached = ("reached" if notes["target_reached"] else
                   "**not reached** at any threshold: the best accuracy is used")
        lines.append(f"- `unsure` when the confidence is below "
                     f"{chosen.confidence_threshold:.4f}: the lowest at which the validation "
                     f"answers kept reach accuracy {notes['target_accuracy']} ({reached}; "
                     f"{notes['val_coverage']:.0%} kept, accuracy "
                     f"{notes['val_accuracy_kept']:.4f} against {notes['val_accuracy']:.4f} "
                     "on all)")
    if evaluation is not None and "coverage" in evaluation:
        lines.append(f"- test split: {evaluation['coverage']:.1%} answered `ok` at accuracy "
                     f"{evaluation['accuracy_answered']:.4f}; {evaluation['unsure_share']:.1%} "
                     f"unsure, {evaluation['unknown_share']:.1%} unknown")
        if "ood_images" in evaluation:
            lines.append(f"- of {evaluation['ood_images']} images of none of the classes "
                         f"(`evaluate.ood_dir`), {evaluation['ood_flagged_unknown']:.1%} "
                         f"flagged `unknown`, {evaluation['ood_flagged']:.1%} not `ok`; "
                         f"AUROC {evaluation['ood_auroc']:.4f}, FPR at 95% TPR "
                         f"{evaluation['ood_fpr_at_95_tpr']:.4f}")
    return lines


def model_card(params: Params, data_version: str, prepare: dict, train: TrainReport,
               evaluation: dict | None = None, served_format: str | None = None,
               selective: SelectiveReport | None = None, serving_reason: str = "") -> str:
    """Markdown. `prepare`: reports/prepare.json; `evaluation`: reports/metrics.json once
    evaluate has run."""
    flat = params.flat()
    sizes = prepare.get("split_sizes", {})
    lines = [f"# {params.mlflow.model_name}: InceptionResNetV2 image classifier", ""]
    if params.model.weights is None:
        lines += ["> **Warning: `model.weights` was null (random init).** This version was not "
                  "trained from ImageNet weights: a pipeline check or demo, not a model to "
                  "serve.", ""]
    lines += [
        "## Data",
        f"- data version `{data_version}` (hash of the prepared manifests; the runs' "
        "`data_version` tag and dataset digest)",
        f"- {prepare.get('n_classes', '?')} classes, {prepare.get('n_images', '?')} images: "
        f"train {sizes.get('train', '?')}, validation {sizes.get('val', '?')}, "
        f"test {sizes.get('test', '?')}",
    ]
    skipped = prepare.get("skipped_by_reason") or {}
    lines.append("- skipped by prepare: " + (", ".join(f"{reason} {count}" for reason, count
                                                       in skipped.items()) or "none"))
    groups = prepare.get("near_duplicate_groups")
    if groups is not None:
        lines.append(f"- near-duplicate groups kept within one split: {len(groups)}; "
                     f"suspected label conflicts: "
                     f"{sum(1 for g in groups if g['label_conflict'])}")
    lines += ["", "## Training", "| param | value |", "|---|---|"]
    lines += [f"| `{key}` | {_yaml(flat[key])} |" for key in CARD_PARAMS if key in flat]
    if train.best_epoch is not None:
        lines.append(f"\nBest epoch {train.best_epoch} of {train.epochs_run} by "
                     f"`{train.monitor}` = {_number(train.best_value)}.")
    calibration = train.calibration
    lines += ["", "## Calibration"]
    if calibration:
        lines.append(f"Temperature {calibration['temperature']:.3f}, fitted on the validation "
                     f"split (log loss {calibration['val_log_loss_before']:.4f} -> "
                     f"{calibration['val_log_loss_after']:.4f}) and baked into the model: "
                     "its probabilities are calibrated; its top-1 answers are those of the "
                     "uncalibrated network.")
    else:
        lines.append("None (`train.calibrate: false`): probabilities are the network's own.")
    if selective is not None:
        lines += _selective_section(selective, evaluation)
    if served_format is not None:
        lines += ["", "## Serving", f"Computes with `{served_format}`"
                  + (f": {serving_reason}." if serving_reason else ".")]
    lines += ["", "## Test split (held out: never used for training or model choice)"]
    if evaluation is None:
        lines.append("Not evaluated yet: the evaluate stage writes this section.")
    else:
        lines += [f"Measured on the model as served ({served_format}), from the test files' "
                  "bytes.", "", "| metric | value |", "|---|---|"]
        shown = ("accuracy", "top5_accuracy", "macro_f1", "log_loss", "log_loss_uncalibrated",
                 "ece", "ece_uncalibrated", "n_test", "keras_accuracy",
                 "served_keras_top1_agreement", "coverage", "accuracy_answered", "aurc",
                 "ood_auroc", "ood_fpr_at_95_tpr", "ood_flagged_unknown")
        lines += [f"| {key} | {_number(evaluation[key])} |" for key in shown
                  if key in evaluation]
    return "\n".join(lines) + "\n"
