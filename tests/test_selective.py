"""The trained model says "not one of my classes" and "not sure": the status per image of the
registered model, measured on the session's trained project."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import OOD_DIR, encode, photo, run_module, scene, set_params

from imgclf.model import selective as sel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _served(root):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    version = json.loads((root / "reports/register.json").read_text())["model_version"]
    return mlflow.pyfunc.load_model(f"models:/imgclf/{version}")


def _ask(served, blobs: list[bytes]) -> pd.DataFrame:
    return served.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in blobs]}),
                          params={"scores": True})


def _in_distribution(root, count: int = 24) -> list[bytes]:
    """The test split, and new images drawn as the training images were (their classes'
    distribution; `make_class_folders`' sizes and seeds, seeds it did not use)."""
    test = pd.read_csv(root / "data/prepared/test.csv")
    fresh = [encode(photo(64, 48, seed=(1000 + i) * 7919)) for i in range(count)]
    return [(root / p).read_bytes() for p in test["path"]] + fresh


def test_images_of_another_kind_are_flagged_unknown_far_more_often(trained_project):
    served = _served(trained_project)
    ours = _ask(served, _in_distribution(trained_project))
    other = _ask(served, [encode(scene(96, 72, seed=2000 + i)) for i in range(24)])
    assert ours["error"].eq("").all() and other["error"].eq("").all()
    unknown_ours = (ours["status"] == sel.UNKNOWN).mean()
    unknown_other = (other["status"] == sel.UNKNOWN).mean()
    assert unknown_other >= 0.8, unknown_other
    assert unknown_other - unknown_ours >= 0.5, (unknown_ours, unknown_other)
    assert set(ours["status"]) <= {sel.OK, sel.UNSURE, sel.UNKNOWN}
    # the served score is the one the status is decided by, and every method's is there
    scores = [json.loads(s) for s in other["scores"]]
    assert sorted(scores[0]) == sorted(sel.METHODS)
    method = served.unwrap_python_model().selective.method
    assert np.allclose(other["ood_score"], [s[method] for s in scores])


def test_the_served_model_and_keras_give_the_same_status_on_decided_images(trained_project):
    """The thresholds survive export: the served format (a TFLite or OpenVINO copy, gated on
    its features too) and the Keras model it was checked against decide the same status
    wherever neither threshold is a close call (quantised weights move a score a little, as
    they move a probability)."""
    from imgclf.data.images import load_pixels
    from imgclf.serving.runners import keras_forward

    served = _served(trained_project)
    inner = served.unwrap_python_model()
    assert inner.format != "keras"  # the fixture serves a copy: a real export
    blobs = _in_distribution(trained_project, 12) + [
        encode(scene(96, 72, seed=3000 + i)) for i in range(12)]
    answers = _ask(served, blobs)
    pixels = np.stack([load_pixels(b, inner.image_size, inner.resize)
                       for b in blobs]).astype(np.float32)
    probs, features = keras_forward(inner.model)(pixels)
    keras_status, keras_score = inner.selective.status(probs, features)
    chosen = inner.selective
    # Close calls: within 10% of the OOD threshold, or within 1e-4 of the confidence one (the
    # random-init model's probabilities all lie near 1/3; quantisation moves them by ~1e-5)
    decided = np.ones(len(blobs), bool)
    if chosen.ood_threshold is not None:
        decided &= np.abs(keras_score - chosen.ood_threshold) > 0.1 * abs(chosen.ood_threshold)
    if chosen.confidence_threshold is not None:
        decided &= np.abs(probs.max(1) - chosen.confidence_threshold) > 1e-4
    assert decided.sum() >= len(blobs) // 2, decided.sum()
    assert (answers["status"].to_numpy()[decided] == keras_status[decided]).all()


def test_a_higher_target_accuracy_never_answers_more_of_the_validation_split(trained_project,
                                                                              tmp_path):
    """The selective stage, rerun on the trained model's stored features with rising targets
    (in a copy: the session's project keeps its thresholds)."""
    for rel in ("params.yaml", "models/embeddings.npz", "reports/train.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained_project / rel, tmp_path / rel)
    coverages = []
    for target in (0.2, 0.5, 0.8, 1.0):
        set_params(tmp_path, selective__target_accuracy=target)
        result = run_module("stages.selective", tmp_path)
        assert result.returncode == 0, result.stderr
        coverages.append(json.loads((tmp_path / "reports/selective.json").read_text())
                         ["notes"]["val_coverage"])
    assert coverages == sorted(coverages, reverse=True), coverages
    set_params(tmp_path, selective__ood_keep=1.5)
    refused = run_module("stages.selective", tmp_path)
    assert refused.returncode == 2 and "selective.ood_keep = 1.5" in refused.stderr


def test_evaluate_measures_the_flags_on_test_and_on_images_of_no_class(trained_project):
    if not (trained_project / "reports/metrics.json").is_file():
        result = run_module("stages.evaluate", trained_project)
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((trained_project / "reports/metrics.json").read_text())
    n_ood = len(list((trained_project / OOD_DIR).glob("*.png")))
    assert summary["ood_images"] == n_ood
    assert summary["ood_flagged_unknown"] >= 0.8
    assert summary["ood_auroc"] >= 0.8
    assert 0 <= summary["coverage"] <= 1 and 0 <= summary["aurc"] <= 1
    assert summary["coverage"] + summary["unsure_share"] + summary["unknown_share"] == \
        pytest.approx(1.0, abs=1e-5)
    methods = pd.read_csv(trained_project / "reports/ood_methods.csv")
    assert sorted(methods["method"]) == sorted(sel.METHODS)
    assert methods["served"].sum() == 1
    curve = pd.read_csv(trained_project / "reports/plots/risk_coverage.csv")
    assert curve["coverage"].is_monotonic_increasing and curve["coverage"].iloc[-1] == 1.0
    for name in ("risk_coverage.png", "ood_scores.png"):
        assert (trained_project / "reports/figures" / name).read_bytes()[:4] == b"\x89PNG"
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    register = json.loads((trained_project / "reports/register.json").read_text())
    card = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(
        register["registered_model"], str(register["model_version"])).description
    chosen = json.loads((trained_project / "reports/selective.json").read_text())
    assert f"above {chosen['ood_threshold']:.6g}" in card
    assert f"of {n_ood} images of none of the classes" in card
