"""Bad input end to end: every broken and odd file kind, class names with spaces and non-ASCII
letters, through prepare, training, `imgclf predict` and the served model."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from conftest import (
    BAD_INPUT_CLASSES,
    ROOT,
    TINY,
    encode,
    photo,
    png_header_bomb,
    run_module,
    set_params,
    write_bad_input_corpus,
)


@pytest.mark.slow
def test_bad_input_corpus_through_the_whole_pipeline(project):
    corpus = write_bad_input_corpus(project / "data/raw")
    # Phase 2 adds nothing here; served by Keras, its answers are the Keras model's own.
    set_params(project, **{**TINY, "train__finetune_epochs": 0,
                           "mlflow__serving_format": "keras"})

    prepared = run_module("stages.prepare", project)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report = json.loads((project / "reports/prepare.json").read_text())
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped == {**corpus["skipped"], **dict.fromkeys(corpus["conflict"], "label_conflict")}
    kept = sorted(pd.concat(pd.read_csv(project / f"data/prepared/{split}.csv")
                            for split in ("train", "val", "test"))["path"])
    assert kept == corpus["valid"]  # nothing valid lost
    assert report["duplicates"][0]["dropped"] == [corpus["duplicate"]]
    assert json.loads((project / "data/prepared/classes.json").read_text()) == \
        sorted(BAD_INPUT_CLASSES)

    for stage in ("stages.features", "stages.train", "stages.selective", "stages.package",
                  "stages.register"):
        done = run_module(stage, project)
        assert done.returncode == 0, done.stderr[-3000:]

    # `imgclf predict` over the raw folder: every readable image gets a label, every broken
    # one a warning with its reason, and the run succeeds.
    out = project / "predictions.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    predicted = subprocess.run(
        [sys.executable, "-m", "imgclf.cli.main", "predict", "data/raw", "--model",
         "models/model.keras", "-o", str(out)], cwd=project, env=env, capture_output=True,
        text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    frame = pd.read_csv(out, encoding="utf-8")
    assert set(frame["label_1"]) <= set(BAD_INPUT_CLASSES)
    assert set(corpus["valid"]) <= set(frame["path"])
    unreadable = {p: r for p, r in corpus["skipped"].items()
                  if r in ("empty_file", "not_an_image", "corrupt", "too_large")}
    assert not set(unreadable) & set(frame["path"])
    for path, reason in unreadable.items():
        line = next(li for li in predicted.stderr.splitlines() if path in li)
        assert "skipped" in line and (reason in line or reason == "empty_file"), line
    assert time.monotonic() - start < 120

    # The registered model, as `mlflow models serve` runs it: one request with everything.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/imgclf/1")
    uploads = {p: (project / p).read_bytes() for p in corpus["valid"]}
    uploads.update({p: (project / p).read_bytes() for p in corpus["skipped"]})
    uploads["huge upload"] = png_header_bomb(50_000, 50_000)
    uploads["garbage text"] = b"GIF89a but not really"
    request = pd.DataFrame({"image": [base64.b64encode(v).decode() for v in uploads.values()]})
    answer = served.predict(request)
    by_name = dict(zip(uploads, answer.to_dict("records"), strict=True))
    # With serving_format: keras (set above) served answers are the Keras model's own.
    keras_answers = frame.set_index("path")
    for path in corpus["valid"]:
        assert by_name[path]["error"] == "" and by_name[path]["label"] in BAD_INPUT_CLASSES
        assert by_name[path]["label"] == keras_answers.loc[path, "label_1"]
        assert by_name[path]["confidence"] == pytest.approx(keras_answers.loc[path, "prob_1"],
                                                            abs=1e-5)
    for name in ("huge upload", f"data/raw/{BAD_INPUT_CLASSES[2]}/bomb.png"):
        assert by_name[name]["error"].startswith("too_large"), by_name[name]
    for name in ("garbage text", f"data/raw/{BAD_INPUT_CLASSES[0]}/notes.jpg"):
        assert by_name[name]["label"] is None and by_name[name]["error"]
    labels = json.loads(by_name[corpus["valid"][0]]["top_k"])
    assert {item["label"] for item in labels} <= set(BAD_INPUT_CLASSES)
    # A path on the server's disk is not an upload: refused, never read.
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="not base64"):
        served.predict(pd.DataFrame({"image": [str(project / corpus["valid"][0])]}))


def test_oversized_images_are_refused_from_the_header(tmp_path):
    """A 2.5-gigapixel claim is refused in milliseconds, without allocating its pixels."""
    import resource

    from imgclf.data.images import ImageRejected, load_pixels

    bomb = png_header_bomb(50_000, 50_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ImageRejected) as err:
        load_pixels(bomb, 75, "crop", max_pixels=64_000_000)
    assert err.value.reason == "too_large"
    assert time.monotonic() - start < 1.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100
    # The limit is the one given: a normal photo under it decodes.
    assert load_pixels(encode(photo(64, 48)), 75, "crop", max_pixels=64 * 48).shape == (75, 75, 3)
