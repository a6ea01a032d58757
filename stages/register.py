"""DVC stage `register`: the trained model logged to its MLflow run and registered.

Reads params sections mlflow (model_name, serving_format), model (image_size, resize),
prepare.max_pixels, and what `train` and `package` wrote. Logs models/model.keras as an
MLflow pyfunc over image files, with the package stage's copy it serves with (TFLite or
OpenVINO: `mlflow.serving_format: auto`, the fastest that agrees) and the selective stage's scores
and thresholds (the status per image), registers it as a new version of
`mlflow.model_name` with its model card, and writes reports/register.json. Its own stage so
that renaming the model, the serving format or the serving code registers again without
retraining; a rerun with nothing changed registers nothing.
"""

from __future__ import annotations

from imgclf.errors import UserError, exits_cleanly
from imgclf.params import load_params
from imgclf.stage_reports import PackageReport, SelectiveReport, TrainReport


@exits_cleanly
def main() -> None:
    params = load_params()
    trained, package, chosen = TrainReport.read(), PackageReport.read(), SelectiveReport.read()
    for report, stage in ((package, "package"), (chosen, "selective")):
        if report.weights_digest != trained.weights_digest:
            raise UserError(f"the {stage} stage's files belong to another model than "
                            f"models/model.keras: run it again (dvc repro {stage})")
    from imgclf.tracking import store
    from imgclf.tracking.registration import register

    store.check_reachable()
    report = register(store.make_client(), params, trained, package)
    report.write()
    print(f"register: {report.model_uri} is {report.registered_model} version "
          f"{report.model_version} (serving with {report.serving_format})")


if __name__ == "__main__":
    main()
