"""DVC stage `export`: SavedModel (image bytes in), TFLite and OpenVINO copies, labels;
parity (and speed). Reads params export, model (image_size, resize), prepare.max_pixels, and
what `package` wrote: its SavedModel and serving candidates ship as they are, with package's
checks; its Keras test answers are the reference for a TFLite variant converted here. Writes
models/export/ and reports/export.json (logged to the training run); with export.measure,
every format's speed and the served version's costs (`mlflow models serve`). Fails when an
exact format differs from Keras. No TensorFlow unless it converts or times (export.measure).
"""

from __future__ import annotations

from pathlib import Path

from imgclf import io, paths
from imgclf.errors import exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import PackageReport, RegisterReport


@exits_cleanly
def main() -> None:
    params = load_params()
    package, registered = PackageReport.read(), RegisterReport.read()
    from imgclf.data.manifests import read_classes, read_manifest
    from imgclf.export import reference
    from imgclf.export.formats import export_all
    from imgclf.tracking import runs, store
    from imgclf.tracking.deployment import registered_serving

    classes = read_classes()
    files, _ = read_manifest("test", classes)
    report = export_all(params, paths.MODEL_FILE, classes, files, paths.SAVED_MODEL_DIR,
                        reference.read(files, package.weights_digest, with_features=True),
                        {"saved_model": package.saved_model, **package.candidates},
                        {fmt: paths.SERVING_FORMATS[fmt] for fmt in package.candidates})
    if params.export.measure:
        report["serving"] = registered_serving(registered, files, Path.cwd())
    io.write_json(paths.EXPORT_REPORT, report)
    runs.log_export(store.make_client(), registered.run_id, paths.EXPORT_REPORT, report["formats"])
    print(f"export: {paths.EXPORT_DIR} (recommended: {report['recommended']}, "
          + (f"{report['speedup_vs_keras_predict']}x Keras predict at batch "
             f"{report['batch_size']})" if report["measured"] else
             "the smallest that agrees; export.measure true times them)"))
    for name, fmt in report["formats"].items():
        timing = (f"{fmt['latency_ms_batch1']:>9.1f} ms/img {fmt['images_per_s']:>8.1f} img/s"
                  if report["measured"] else "")
        agreement = ("not checked (a faster copy agrees)" if fmt["top1_agreement"] is None
                     else f"{fmt['top1_agreement']:.4f}" + (
                         "  (below a gate: never recommended)" if not fmt["agrees"] else ""))
        print(f"  {name:<16}{fmt['size_mb']:>9.1f} MB {timing}  top-1 agreement {agreement}")
    if "serving" in report:
        serving = report["serving"]
        print(f"  served {serving['model']}: environment {serving['environment_mb']:.0f} MB, "
              f"cold start {serving['cold_start_seconds']:.1f} s, "
              f"{serving['images_per_s_batch32']:.1f} img/s at 32 a request")


if __name__ == "__main__":
    main()
