"""DVC stage `export`: SavedModel (image bytes in), TFLite variants, labels; parity and speed.

Reads params sections export, model (image_size, resize), prepare.max_pixels. Writes
models/export/ and reports/export.json, and logs the report and the fastest format that
keeps the agreement gate (for `imgclf predict`) to the training run in MLflow. Fails when the
SavedModel or TFLite float32 disagree with the Keras model (top-1 on any test image, or a
probability off by more than 1e-4): an export that changes answers must not ship.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages import atomic, paths
from stages.errors import UserError, exits_cleanly
from stages.params import Params, load_params

FLOAT_TOLERANCE = 1e-4


def collect_probs(runners: dict, files: list[str], size: int, resize: str,
                  batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every runner's probabilities on the same decoded test pixels, one batch at a time."""
    from stages.predicting import iter_batches

    out: dict[str, list] = {name: [] for name in runners}
    sample = None
    for _good, pixels, bad in iter_batches(files, size, resize, batch_size):
        if bad:
            raise UserError(f"test image {files[bad[0][0]]} cannot be read: rerun prepare")
        if sample is None:
            sample = pixels[:8]
        for name, runner in runners.items():
            out[name].append(runner(pixels))
    return {k: np.concatenate(v) for k, v in out.items()}, sample


def bytes_agreement(saved_model, files: list[str], reference: np.ndarray,
                    batch_size: int) -> float:
    """Top-1 agreement of the image-bytes signature (TF decoding) with Keras on PIL pixels."""
    from stages.exporting import saved_model_bytes_fn

    fn = saved_model_bytes_fn(saved_model)
    predicted = []
    for start in range(0, len(files), batch_size):
        blobs = [Path(f).read_bytes() for f in files[start:start + batch_size]]
        predicted.append(fn(blobs)["probabilities"].numpy().argmax(1))
    return round(float((np.concatenate(predicted) == reference.argmax(1)).mean()), 6)


def export(params: Params, model, classes: list[str], files: list[str]) -> dict:
    import tensorflow as tf

    from stages import exporting as ex
    from stages.predicting import keras_predictor

    size, resize = params.model.image_size, params.model.resize
    batch = params.export.bench_batch_size
    with atomic.replaced_dir(paths.EXPORT_DIR) as staging:
        ex.write_saved_model(model, classes, size, resize, staging / ex.SAVED_MODEL)
        ex.write_tflite(staging / ex.SAVED_MODEL,
                        {v: staging / ex.tflite_name(v) for v in params.export.tflite})
        (staging / ex.LABELS).write_text("\n".join(classes) + "\n", encoding="utf-8")

        keras_fn = keras_predictor(model)
        saved_model = tf.saved_model.load(str(staging / ex.SAVED_MODEL))
        runners = {"keras": ex.Runner("keras", keras_fn, paths.MODEL_FILE.stat().st_size),
                   "saved_model": ex.saved_model_runner(staging / ex.SAVED_MODEL, saved_model)}
        for variant in params.export.tflite:
            runners[f"tflite_{variant}"] = ex.tflite_runner(
                staging / ex.tflite_name(variant), f"tflite_{variant}")
        probs, sample = collect_probs(runners, files, size, resize, batch)
        reference = probs["keras"]
        formats: dict[str, dict] = {}
        keras_predict = ex.Runner("keras_predict",
                                  lambda x: model.predict(x, batch_size=len(x), verbose=0), 0)
        baseline = ex.speed(keras_predict, sample, batch)
        formats["keras"] = {"size_mb": round(runners["keras"].size_bytes / 1e6, 2),
                            **baseline, "top1_agreement": 1.0, "max_abs_diff": 0.0}
        for name, runner in runners.items():
            if name == "keras":
                continue
            formats[name] = {"size_mb": round(runner.size_bytes / 1e6, 2),
                             **ex.speed(runner, sample, batch), **ex.parity(reference, probs[name])}
        exact = ["saved_model"] + (["tflite_float32"] if "tflite_float32" in formats else [])
        broken = [n for n in exact if formats[n]["top1_agreement"] < 1.0
                  or formats[n]["max_abs_diff"] > FLOAT_TOLERANCE]
        if broken:
            raise RuntimeError(f"export parity failed for {broken}: "
                               f"{ {n: formats[n] for n in broken} }")
        usable = exact + [n for n in formats if n.startswith("tflite_") and n not in exact
                          and formats[n]["top1_agreement"] >= ex.QUANTISED_MIN_AGREEMENT]
        recommended = max(usable, key=lambda n: formats[n]["images_per_s"])
        report = {
            "n_test": len(files), "image_size": size, "resize": resize, "batch_size": batch,
            "formats": formats, "recommended": recommended,
            "speedup_vs_keras_predict": round(
                formats[recommended]["images_per_s"] / formats["keras"]["images_per_s"], 2),
            "bytes_signature_top1_agreement": bytes_agreement(
                saved_model, files, reference, batch),
        }
        (staging / ex.META).write_text(json.dumps(
            {"image_size": size, "resize": resize, "recommended": recommended,
             "max_pixels": params.prepare.max_pixels,
             "formats": {n: {"top1_agreement": f["top1_agreement"]}
                         for n, f in formats.items()}}, indent=2), encoding="utf-8")
    return report


@exits_cleanly
def main() -> None:
    params = load_params()
    if not paths.MODEL_FILE.is_file():
        raise UserError("no trained model: run the train stage first (dvc repro train)")
    import keras

    from stages import tracking
    from stages.inputs import read_classes, read_manifest

    classes = read_classes()
    files, _ = read_manifest("test", classes)
    model = keras.models.load_model(paths.MODEL_FILE, safe_mode=True)
    report = export(params, model, classes, files)
    atomic.write_json(paths.EXPORT_REPORT, report)
    if paths.TRAIN_REPORT.is_file():
        run_id = json.loads(paths.TRAIN_REPORT.read_text(encoding="utf-8"))["run_id"]
        client = tracking.make_client()
        client.log_artifact(run_id, str(paths.EXPORT_REPORT), artifact_path="export")
        # The fastest format that keeps the agreement gate, for `imgclf predict` from the
        # registry (a few MB to tens of MB: the TFLite file in most cases).
        from stages.exporting import PREDICT_ARTIFACT, recommended_files

        for path in recommended_files(paths.EXPORT_DIR):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), f"{PREDICT_ARTIFACT}/{path.name}")
            else:
                client.log_artifact(run_id, str(path), artifact_path=PREDICT_ARTIFACT)
        for name, fmt in report["formats"].items():
            for key in ("images_per_s", "latency_ms_batch1", "size_mb", "top1_agreement"):
                client.log_metric(run_id, f"export_{name}_{key}", float(fmt[key]))
    print(f"export: {paths.EXPORT_DIR} (recommended: {report['recommended']}, "
          f"{report['speedup_vs_keras_predict']}x Keras predict at batch "
          f"{report['batch_size']})")
    for name, fmt in report["formats"].items():
        print(f"  {name:<16}{fmt['size_mb']:>9.1f} MB {fmt['latency_ms_batch1']:>9.1f} ms/img "
              f"{fmt['images_per_s']:>8.1f} img/s  top-1 agreement {fmt['top1_agreement']:.4f}")


if __name__ == "__main__":
    main()
