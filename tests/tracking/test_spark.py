"""Batch scoring on Spark (local mode): the registered model as `mlflow.pyfunc.spark_udf` over
Spark's `binaryFile` rows gives `imgclf predict`'s answers, and broken files a per-row error.

Needs Java; `.ci/run` installs Debian's JRE when the machine lacks one. No skip: a Spark that
cannot start fails this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import OOD_DIR, encode, photo, write


def imgclf(project: Path, *args: str):
    exe = Path(sys.executable).parent / "imgclf"
    return subprocess.run([str(exe), *args], cwd=project, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_spark_scores_a_folder_as_predict_does(trained_project, tmp_path):
    folder = tmp_path / "to score"
    for source in ("data/raw/alpha", "data/raw/gamma", OOD_DIR):
        for path in sorted((trained_project / source).iterdir())[:4]:
            write(folder / Path(source).name / path.name, path.read_bytes())
    write(folder / "nested/deeper/extra.JPG", encode(photo(90, 70, seed=5), "JPEG"))
    write(folder / "broken.jpg", b"not an image")
    write(folder / "broken_too.png", b"\x89PNG\r\n\x1a\n truncated")
    write(folder / "notes.txt", b"not a photo at all")
    model = "models:/imgclf/1"

    # Batches of one image: a batch holding nothing but a broken file must answer its row,
    # not fail the job (the served model refuses such a request with HTTP 400).
    out = tmp_path / "answers.parquet"
    spark = imgclf(trained_project, "spark-predict", str(folder), "-o", str(out),
                   "--model", model, "--master", "local[2]", "--batch-size", "1")
    assert spark.returncode == 0, spark.stderr[-4000:]
    assert "13 image(s)" in spark.stderr and "2 unreadable" in spark.stderr, spark.stderr
    answers = pd.read_parquet(out)
    answers["path"] = [re.sub(r"^file:", "", p) for p in answers["path"]]
    answers = answers.set_index("path").sort_index()

    local = tmp_path / "predict.csv"
    predicted = imgclf(trained_project, "predict", str(folder), "--model", model, "-o",
                       str(local))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = pd.read_csv(local).set_index("path").sort_index()

    assert set(answers.index) == set(expected.index) | {str(folder / "broken.jpg"),
                                                        str(folder / "broken_too.png")}
    read = answers.loc[expected.index]
    assert (read["error"] == "").all()
    assert list(read["label"]) == list(expected["label_1"])
    assert list(read["status"]) == list(expected["status"])
    np.testing.assert_allclose(read["confidence"], expected["prob_1"], atol=1e-6)
    # Batches of one here, of 32 in predict: the forward pass's round-off differs a little.
    np.testing.assert_allclose(read["ood_score"], expected["ood_score"], atol=1e-4)
    assert {"ok", "unknown"} <= set(read["status"])  # the statuses are the model's, not blank
    for name in ("broken.jpg", "broken_too.png"):
        row = answers.loc[str(folder / name)]
        # The reason predict prints for the file it skips.
        assert f"skipped {folder / name}: {row['error']}" in predicted.stderr
        assert row["label"] is None and row["status"] is None
