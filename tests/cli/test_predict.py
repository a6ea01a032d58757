"""`imgclf predict` as a user runs it: files and folders, both formats, bad files, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from conftest import encode, photo, write

from imgclf.data.images import load_pixels


def imgclf(project: Path, *args: str):
    exe = Path(sys.executable).parent / "imgclf"
    return subprocess.run([str(exe), *args], cwd=project, capture_output=True, text=True,
                          timeout=600)


def keras_probs(project: Path, files: list[Path]) -> np.ndarray:
    model = keras.models.load_model(project / "models/model.keras", safe_mode=True)
    batch = np.stack([load_pixels(str(f), 75, "crop") for f in files]).astype("float32")
    return model.predict(batch, verbose=0)


def test_kaggle_format_from_a_folder_with_bad_files(trained_project, tmp_path):
    folder = tmp_path / "new photos"
    shutil.copytree(trained_project / "data/raw/beta", folder / "beta")
    write(folder / "nested/extra.JPG", encode(photo(90, 70, seed=5), "JPEG"))
    write(folder / "broken.jpg", b"not an image")
    write(folder / ".DS_Store", b"\x00")
    out = tmp_path / "submission.csv"
    result = imgclf(trained_project, "predict", str(folder), "--model", "models/model.keras",
                    "--format", "kaggle", "--output", str(out), "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: skipped" in result.stderr and "broken.jpg" in result.stderr
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["id", *classes]
    good = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in
                  ("broken.jpg", ".DS_Store"))
    assert sorted(frame["id"]) == sorted(p.stem for p in good)
    np.testing.assert_allclose(frame[classes].sum(axis=1), 1.0, atol=1e-4)
    # Results equal the Keras model's on the same images.
    order = {p.stem: i for i, p in enumerate(good)}
    expected = keras_probs(trained_project, good)
    got = frame.set_index("id").loc[sorted(order, key=order.get), classes].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_labels_format_from_the_registry(trained_project, tmp_path):
    files = sorted((trained_project / "data/raw/alpha").iterdir())[:3]
    result = imgclf(trained_project, "predict", *map(str, files), "--model",
                    "models:/imgclf/1", "--top-k", "2", "--exact")
    assert result.returncode == 0, result.stderr[-2000:]
    frame = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert list(frame.columns) == ["path", "status", "ood_score", "label_1", "prob_1",
                                   "label_2", "prob_2"]
    assert (frame["prob_1"] >= frame["prob_2"]).all()
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    expected = keras_probs(trained_project, files)
    assert list(frame["label_1"]) == [classes[i] for i in expected.argmax(1)]
    # As served (no --exact): each image's status and the score behind `unknown` too.
    served = imgclf(trained_project, "predict", *map(str, files), "--model",
                    "models:/imgclf/1", "--top-k", "1")
    assert served.returncode == 0, served.stderr[-2000:]
    frame = pd.read_csv(pd.io.common.StringIO(served.stdout))
    assert list(frame.columns) == ["path", "status", "ood_score", "label_1", "prob_1"]
    assert set(frame["status"]) <= {"ok", "unsure", "unknown"}


def test_nothing_readable_exits_nonzero_and_bad_model_exits_2(trained_project, tmp_path):
    bad = write(tmp_path / "a.png", b"")
    result = imgclf(trained_project, "predict", str(bad), "--model", "models:/imgclf/1")
    assert result.returncode == 1
    assert "empty_file" in result.stderr and "none of the files" in result.stderr
    result = imgclf(trained_project, "predict", str(bad), "--model", "models:/nope@production")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot load model models:/nope@production" in result.stderr
    # A path that does not exist is named, with exit 2 (a user's mistake), before any model
    # is loaded.
    result = imgclf(trained_project, "predict", "/nonexistent/photos")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "/nonexistent/photos" in result.stderr and "no such file or folder" in result.stderr


def test_predict_a_folder_outside_the_project_given_with_dot_dot(trained_project, tmp_path):
    # `imgclf predict ../photos`: the `..` is the user's path, not a hidden folder.
    photos = tmp_path / "photos"
    for i, src in enumerate(sorted((trained_project / "data/raw/alpha").glob("*.png"))[:3]):
        write(photos / f"p{i}.png", src.read_bytes())
    write(photos / ".hidden.png", b"")  # hidden inside the folder: still skipped
    rel = os.path.relpath(photos, trained_project)
    assert rel.startswith("..")
    # The served version (no TensorFlow to start): the paths are the CLI's, not the model's.
    result = imgclf(trained_project, "predict", rel, "--model", "models:/imgclf/1")
    assert result.returncode == 0, result.stderr[-2000:]
    frame = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert len(frame) == 3 and all(p.startswith("..") for p in frame["path"])


def test_predict_from_the_registry_answers_as_the_served_model(trained_project, tmp_path):
    import base64

    import mlflow

    files = sorted((trained_project / "data/raw/gamma").iterdir())
    out = tmp_path / "sub.csv"
    result = imgclf(trained_project, "predict", *map(str, files), "--model",
                    "models:/imgclf/1", "--format", "kaggle", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{trained_project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/imgclf/1")
    assert f"[models:/imgclf/1 ({served.unwrap_python_model().format})]" in result.stderr
    answers = served.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode()
                                                     for f in files]}),
                             params={"probabilities": True})
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    frame = pd.read_csv(out)
    assert list(frame["id"]) == [f.stem for f in files]
    np.testing.assert_allclose(frame[classes].to_numpy(),
                               np.array([json.loads(p) for p in answers["probabilities"]]),
                               rtol=1e-5, atol=1e-7)
