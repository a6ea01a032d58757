"""`imgclf predict`: class probabilities for image files and folders.

MODEL is `models:/NAME@ALIAS`, `models:/NAME/VERSION` (the MLflow registry of the project's
store, or MLFLOW_TRACKING_URI), a `.keras` file (classes from data/prepared/classes.json or
a classes.json beside it), or an export folder (models/export).

From the registry it uses the version's fastest export when the export stage has logged one
to its run (`export/predict`: the fastest format whose top-1 agreement with the Keras model
on the test split is >= 98%; TFLite dynamic-range in most cases); `--exact` (and `--tta`)
use the Keras model itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from imgclf import io, paths
from imgclf.errors import UserError
from imgclf.serving.runners import LoadedModel


def load_model(spec: str, tta: bool = False, exact: bool = False) -> LoadedModel:
    from imgclf.serving.runners import keras_predictor, load_keras_file

    path = Path(spec)
    if spec.startswith("models:/") or spec.startswith("runs:/"):
        from imgclf.serving.runners import load_export
        from imgclf.tracking import registry

        if not exact and not tta and spec.startswith("models:/"):
            # Loaded into memory, then the download goes: nothing piles up in /tmp.
            with registry.predict_export(spec) as folder:
                if folder is not None:
                    return load_export(folder, label=spec)
        inner = registry.load_pyfunc(spec).unwrap_python_model()
        if exact or tta or inner.format == "keras":
            forward, label = keras_predictor(inner.model, tta), spec
        else:
            forward, label = inner.forward, f"{spec} ({inner.format})"
        return LoadedModel(forward, inner.classes, inner.image_size, inner.resize, label,
                           inner.max_pixels)
    if path.is_dir():
        from imgclf.serving.runners import load_export

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


def format_labels(files, probs, good, classes, top_k: int) -> pd.DataFrame:
    rows = []
    k = min(top_k, len(classes))
    for row, index in enumerate(good):
        order = probs[row].argsort()[::-1][:k]
        record = {"path": files[index]}
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
    from imgclf.serving.batches import collect_images, predict_files

    files, missing = collect_images(args.paths)
    for item in missing:
        print(f"warning: {item}: no such file or folder", file=sys.stderr)
    if not files:
        where = ", ".join(missing) if missing else ", ".join(args.paths)
        raise UserError(f"no image files to predict in {where}"
                        + (" (no such file or folder)" if missing == args.paths else ""))
    model = load_model(args.model or f"models:/{configured_model_name()}@production",
                       tta=args.tta, exact=args.exact)
    with tqdm(total=len(files), unit="img", desc="predict") as bar:
        probs, good, bad = predict_files(model, files, args.batch_size, on_batch=bar.update)
    for index, reason in bad:
        print(f"warning: skipped {files[index]}: {reason}", file=sys.stderr)
    if not good:
        print("error: none of the files could be read as an image", file=sys.stderr)
        return 1
    if args.format == "kaggle":
        frame = format_kaggle(files, probs, good, model.classes)
    else:
        frame = format_labels(files, probs, good, model.classes, args.top_k)
    if args.output:
        io.write_csv(args.output, frame)
        print(f"predict: {len(good)} image(s) -> {args.output}"
              f"{f' ({len(bad)} skipped)' if bad else ''} [{model.source}]", file=sys.stderr)
        from imgclf.tracking.runs import log_to_entry_run

        log_to_entry_run({"imgclf.command": "predict", "imgclf.model": model.source,
                          "imgclf.images": len(good), "imgclf.skipped": len(bad)},
                         [Path(args.output)])
    else:
        sys.stdout.write(io.csv_text(frame))
    return 0


def _positive(text: str) -> int:
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
    p.add_argument("--top-k", type=_positive, default=5, metavar="K", help="labels format: top K")
    p.add_argument("--format", choices=("labels", "kaggle"), default="labels",
                   help="labels: path + top-k labels and probabilities; kaggle: id + one "
                        "probability column per class (the dog-breed submission format)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N")
    p.add_argument("--exact", action="store_true",
                   help="use the Keras model itself, not the fastest export (which agrees with "
                        "it on >= 98%% of the test images, top-1)")
    p.add_argument("--tta", action="store_true",
                   help="average over the image and its horizontal flip")

