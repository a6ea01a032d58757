"""evaluate: held-out metrics, tables and pictures, logged to the training run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import run_module
from mlflow.tracking import MlflowClient

from imgclf import metrics


def test_metrics_on_known_predictions():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8],
                      [0.9, 0.05, 0.05]])
    labels = np.array([0, 1, 1, 2, 2])
    summary = metrics.summary_metrics(probs, labels)
    assert summary["accuracy"] == 0.6 and summary["n_test"] == 5
    assert summary["top5_accuracy"] == 1.0
    table = metrics.per_class_table(probs, labels, ["a", "b", "c"])
    assert list(table["support"]) == [1, 2, 2]
    assert table.loc[0, "precision"] == 1 / 3  # three predicted "a", one right
    pairs = metrics.confused_pairs(metrics.confusion(probs, labels, 3), ["a", "b", "c"])
    assert set(zip(pairs["actual"], pairs["predicted"], strict=True)) == {("b", "a"), ("c", "a")}
    # index 4 (0.9 for a wrong class) is more confidently wrong than index 2 (0.6)
    assert metrics.confidently_wrong(probs, labels, 10) == [4, 2]


def test_evaluate_stage_writes_reports_and_logs_to_the_training_run(trained_project):
    result = run_module("stages.evaluate", trained_project)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = trained_project / "reports"
    summary = json.loads((reports / "metrics.json").read_text())
    assert {"accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "log_loss",
            "n_test"} <= set(summary)
    test = pd.read_csv(trained_project / "data/prepared/test.csv")
    assert summary["n_test"] == len(test)
    per_class = pd.read_csv(reports / "per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["support"].sum() == len(test)
    confusion = pd.read_csv(reports / "plots/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test)
    assert round((confusion["actual"] == confusion["predicted"]).mean(), 6) == summary["accuracy"]
    for name in ("confusion_matrix.png", "per_class_f1.png", "misclassified.png"):
        assert (reports / "figures" / name).read_bytes()[:4] == b"\x89PNG"

    train = {**json.loads((reports / "train.json").read_text()),
             **json.loads((reports / "register.json").read_text())}
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(train["run_id"])
    assert run.data.metrics["test_accuracy"] == summary["accuracy"]
    assert run.data.metrics["test_log_loss"] == summary["log_loss"]
    logged = {a.path for a in client.list_artifacts(train["run_id"], "evaluation")}
    assert "evaluation/metrics.json" in logged and "evaluation/confusion_matrix.png" in logged
    # The training run's own pictures, drawn or copied here (restyling them never retrains).
    at_root = {a.path for a in client.list_artifacts(train["run_id"])}
    assert {"train_curves.png", "augment_preview.png"} <= at_root
    assert (reports / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    version = client.get_model_version(train["registered_model"], str(train["model_version"]))
    assert float(version.tags["test_accuracy"]) == summary["accuracy"]

    # The numbers are the served model's: the registered version, loaded as a server loads
    # it and sent the test files' bytes, gets exactly the metrics its tags carry.
    import base64

    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/imgclf/{train['model_version']}")
    answers = served.predict(pd.DataFrame({"image": [
        base64.b64encode((trained_project / p).read_bytes()).decode() for p in test["path"]]}),
        params={"probabilities": True})
    accuracy = float((answers["label"] == test["label"].astype(str)).mean())
    assert round(accuracy, 6) == float(version.tags["test_accuracy"]) == summary["accuracy"]
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    probs = np.array([json.loads(p) for p in answers["probabilities"]])
    labels = np.array([classes.index(str(c)) for c in test["label"]])
    assert round(metrics.summary_metrics(probs, labels)["log_loss"], 6) == summary["log_loss"]
    served_format = served.unwrap_python_model().format
    assert version.tags["test_served_format"] == served_format
    if served_format != "keras":  # the Keras model's own numbers, beside
        import keras

        from imgclf.data.images import load_pixels

        model = keras.models.load_model(trained_project / "models/model.keras", safe_mode=True)
        keras_probs = model.predict(np.stack([load_pixels(str(trained_project / p), 75, "crop")
                                              for p in test["path"]]).astype("float32"))
        assert summary["served_keras_top1_agreement"] == round(
            float((keras_probs.argmax(1) == probs.argmax(1)).mean()), 6)
        assert summary["keras_accuracy"] == round(
            float((keras_probs.argmax(1) == labels).mean()), 6)
    assert "served as" in result.stdout
    assert "calibration: temperature" in result.stdout

    # Calibration numbers, from the same probabilities: the uncalibrated ones are the served
    # probabilities with the temperature taken back out.
    temperature = train["temperature"]
    assert summary["temperature"] == round(temperature, 6)
    assert summary["ece"] == round(metrics.expected_calibration_error(probs, labels), 6)
    before = metrics.with_temperature(probs, 1 / temperature)
    assert summary["ece_uncalibrated"] == round(
        metrics.expected_calibration_error(before, labels), 6)
    assert (reports / "figures/reliability.png").read_bytes()[:4] == b"\x89PNG"

    # The list to relabel from: every misclassified test file, worst first.
    errors = pd.read_csv(reports / "errors.csv", keep_default_na=False,
                         dtype={"true_label": str, "predicted_label": str})
    assert list(errors.columns) == ["path", "true_label", "predicted_label", "confidence",
                                    "loss"]
    wrong = test[answers["label"].to_numpy() != test["label"].astype(str).to_numpy()]
    assert sorted(errors["path"]) == sorted(wrong["path"])
    assert (errors["true_label"] != errors["predicted_label"]).all()
    assert errors["loss"].is_monotonic_decreasing
    if len(errors):
        first = errors.iloc[0]
        row = test["path"].tolist().index(first["path"])
        # (the served JSON carries float32 probabilities; the stage had the float64 ones)
        assert np.isclose(first["loss"], -np.log(probs[row, classes.index(first["true_label"])]),
                          atol=1e-4)
        assert np.isclose(first["confidence"], probs[row].max(), atol=1e-5)


def test_model_card_and_datasets_of_an_evaluated_version(trained_project):
    """The registered version describes itself (its page in the MLflow UI, `imgclf models
    --version`), and the run's datasets carry the data version."""
    if not (trained_project / "reports/metrics.json").is_file():
        assert run_module("stages.evaluate", trained_project).returncode == 0
    train = {**json.loads((trained_project / "reports/train.json").read_text()),
             **json.loads((trained_project / "reports/register.json").read_text())}
    summary = json.loads((trained_project / "reports/metrics.json").read_text())
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version(train["registered_model"], str(train["model_version"]))
    card = version.description
    assert "random init" in card  # the fixture trains with model.weights: null
    assert "3 classes, 21 images" in card
    assert f"| accuracy | {summary['accuracy']:.4f} |" in card
    assert f"| ece | {summary['ece']:.4f} |" in card
    assert f"Temperature {train['temperature']:.3f}" in card
    printed = run_module("imgclf.cli.main", trained_project, "models", "--version",
                         str(train["model_version"]))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == card.strip()

    run = client.get_run(train["run_id"])
    inputs = run.inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in inputs}
    assert contexts == {"train": "training", "val": "validation", "test": "testing"}
    assert {i.dataset.digest for i in inputs} == {run.data.tags["data_version"]}
