"""`imgclf predict`: class probabilities for image files and folders.

MODEL is `models:/NAME@ALIAS`, `models:/NAME/VERSION` (the MLflow registry of the project's
store, or MLFLOW_TRACKING_URI), a `.keras` file (classes from data/prepared/classes.json or
a classes.json beside it), or an export folder (models/export).

From the registry it answers exactly as the served model does: the version's own pyfunc
(the format it serves with, TFLite dynamic-range in most cases) on the files' bytes, the
probabilities that evaluate measured, and each image's `status` (ok, unsure: below the
confidence threshold, unknown: unlike every class) with its out-of-distribution score.
`--exact` uses the Keras model inside it instead, with the same thresholds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgclf import io, paths
from imgclf.errors import UserError
from imgclf.serving.runners import LoadedModel


@dataclass
class Answers:
    probs: object        # (n_good, classes) probabilities
    good: list[int]      # indices of the files answered
    bad: list[tuple[int, str]]
    classes: list[str]
    source: str          # what answered, for the message
    status: list[str] | None = None   # the served model's: ok | unsure | unknown
    ood_score: object = None


def load_model(spec: str, tta: bool = False) -> LoadedModel:
    """A `.keras` file or an export folder, as a LoadedModel."""
    from imgclf.serving.runners import load_export, load_keras_file

    path = Path(spec)
    if path.is_dir():
        return load_export(path)
    if path.suffix == ".keras" and path.is_file():
        classes = path.with_name("classes.json")
        classes = classes if classes.is_file() else paths.CLASSES_JSON
        if not classes.is_file():
            raise UserError(f"no classes.json beside {path} nor at {paths.CLASSES_JSON}")
        from imgclf.params import load_params

        if Path("params.yaml").is_file():
            params = load_params()
            return load_keras_file(path, classes, None, params.model.resize, tta,
                                   params.prepare.max_pixels)
        return load_keras_file(path, classes, None, "crop", tta)
    raise UserError(f"--model {spec!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION, "
                    "a .keras file nor an export folder")


@contextmanager
def answering(spec: str, files: list[str], batch_size: int, tta: bool, exact: bool,
              on_batch) -> Iterator[Answers]:
    """Every file's probabilities from the model `spec` names."""
    from imgclf.serving.batches import forward_files, predict_files, predict_served

    if spec.startswith(("models:/", "runs:/")):
        from imgclf.tracking import registry

        with registry.served_model(spec) as served:
            inner = served.unwrap_python_model()
            if exact:
                model = inner.keras_runner(f"{spec} (keras)", tta, features=True)
                probs, features, good, bad = forward_files(model, files, batch_size, on_batch)
                status, score = (inner.selective.status(probs, features) if good
                                 else ([], np.zeros(0)))
                yield Answers(probs, good, bad, inner.classes, model.source, list(status),
                              score)
                return
            out = predict_served(served, files, len(inner.classes), batch_size, tta, on_batch)
            yield Answers(out.probs, out.good, out.bad, inner.classes,
                          f"{spec} ({inner.format})", out.status, out.ood_score)
        return
    model = load_model(spec, tta)
    yield Answers(*predict_files(model, files, batch_size, on_batch), model.classes,
                  model.source)


def format_labels(files, probs, good, classes, top_k: int, status=None,
                  ood_score=None) -> pd.DataFrame:
    rows = []
    k = min(top_k, len(classes))
    for row, index in enumerate(good):
        order = probs[row].argsort()[::-1][:k]
        record = {"path": files[index]}
        if status is not None:
            record["status"] = status[row]
            record["ood_score"] = round(float(ood_score[row]), 6)
        for rank, j in enumerate(order, start=1):
            record[f"label_{rank}"] = classes[j]
            record[f"prob_{rank}"] = round(float(probs[row, j]), 6)
        rows.append(record)
    return pd.DataFrame(rows)


def format_kaggle(files, probs, good, classes) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "id", [Path(files[i]).stem for i in good])
    return frame


def run(args) -> int:
    from imgclf.params import configured_model_name
    from imgclf.serving.batches import collect_images

    files, missing = collect_images(args.paths)
    for item in missing:
        print(f"warning: {item}: no such file or folder", file=sys.stderr)
    if not files:
        where = ", ".join(missing) if missing else ", ".join(args.paths)
        raise UserError(f"no image files to predict in {where}"
                        + (" (no such file or folder)" if missing == args.paths else ""))
    spec = args.model or f"models:/{configured_model_name()}@production"
    with tqdm(total=len(files), unit="img", desc="predict") as bar, \
            answering(spec, files, args.batch_size, args.tta, args.exact, bar.update) as answers:
        probs, good, bad, classes = answers.probs, answers.good, answers.bad, answers.classes
    for index, reason in bad:
        print(f"warning: skipped {files[index]}: {reason}", file=sys.stderr)
    if not good:
        print("error: none of the files could be read as an image", file=sys.stderr)
        return 1
    if args.format == "kaggle":
        frame = format_kaggle(files, probs, good, classes)
    else:
        frame = format_labels(files, probs, good, classes, args.top_k, answers.status,
                              answers.ood_score)
    if args.output:
        io.write_csv(args.output, frame)
        print(f"predict: {len(good)} image(s) -> {args.output}"
              f"{f' ({len(bad)} skipped)' if bad else ''} [{answers.source}]", file=sys.stderr)
        from imgclf.tracking.runs import log_to_entry_run

        log_to_entry_run({"imgclf.command": "predict", "imgclf.model": answers.source,
                          "imgclf.images": len(good), "imgclf.skipped": len(bad)},
                         [Path(args.output)])
    else:
        sys.stdout.write(io.csv_text(frame))
    return 0


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be >= 1")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict classes of image files and folders",
                       description=__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursed)")
    p.add_argument("--model", metavar="MODEL",
                   help="default: models:/<mlflow.model_name>@production")
    p.add_argument("--output", "-o", metavar="FILE", help="CSV file (default: standard output)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="labels format: top K")
    p.add_argument("--format", choices=("labels", "kaggle"), default="labels",
                   help="labels: path + top-k labels and probabilities; kaggle: id + one "
                        "probability column per class (the dog-breed submission format)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    p.add_argument("--exact", action="store_true",
                   help="from the registry: the Keras model inside the registered version, "
                        "not the format it serves with (which agreed with it on >= 98%% of "
                        "the validation images, top-1)")
    p.add_argument("--tta", action="store_true",
                   help="average over the image and its horizontal flip")

