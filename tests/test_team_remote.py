"""docs/team.md's shared DVC remote, for real: two clones, a bare git origin, a local-folder
DVC remote (a real remote type: S3 or SSH differ only in `dvc remote add`).

A runs the pipeline as an experiment, commits, pushes git and DVC and the experiment. B
clones and pulls: nothing is stale, `dvc repro` runs nothing, a training experiment reruns
`train` (what follows it goes stale) but never `features`; B's predictions equal A's, from A's
registered model (a shared tracking store) and from the pulled files; A's experiment shows
in B.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from conftest import TINY, make_class_folders, set_params, sh


@pytest.mark.slow
def test_a_second_clone_pulls_instead_of_rerunning(dvc_repo, tmp_path):
    a, b = dvc_repo, tmp_path / "b"
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    make_class_folders(a / "data/raw", {"cat": 5, "dog": 5, "fox": 5})
    # Served from Keras, so the pulled model.keras and A's registered version answer alike.
    set_params(a, **{**TINY, "train__finetune_epochs": 0, "mlflow__serving_format": "keras"})
    sh(["dvc", "remote", "add", "-d", "shared", str(remote)], a)
    sh(["dvc", "add", "data/raw"], a)
    sh(["git", "add", "-A"], a)
    sh(["git", "commit", "-q", "-m", "data, tiny params, the team's DVC remote"], a)

    started = time.monotonic()
    sh(["dvc", "exp", "run", "-n", "baseline", "evaluate"], a)
    full_run = time.monotonic() - started
    sh(["git", "add", "-A"], a)
    sh(["git", "commit", "-q", "-m", "baseline"], a)
    sh(["dvc", "push"], a)
    sh(["git", "remote", "add", "origin", str(origin)], a)
    sh(["git", "push", "-q", "origin", "main"], a)
    sh(["dvc", "exp", "push", "origin", "baseline"], a)
    sh(["imgclf", "promote", "--latest"], a)
    a_answers = a / "a.csv"
    sh(["imgclf", "predict", "data/raw/fox", "-o", str(a_answers)], a)

    sh(["git", "clone", "-q", str(origin), str(b)], tmp_path)
    started = time.monotonic()
    # A ran the pipeline up to evaluate (export's speed table is not what this is about): B
    # pulls that far. After a whole `dvc repro`, plain `dvc pull` and `dvc status` do.
    sh(["dvc", "pull", "--with-deps", "evaluate"], b)
    assert json.loads(sh(["dvc", "status", "--with-deps", "evaluate", "--json"], b).stdout) == {}
    assert "Running stage" not in sh(["dvc", "repro", "evaluate"], b).stdout
    pulled = time.monotonic() - started
    print(f"A: dvc exp run {full_run:.1f} s; B: dvc pull + dvc status + dvc repro "
          f"{pulled:.1f} s")

    # A's registered model, through the store A logged to (a team tracking server's part).
    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{a / 'mlflow.db'}"}
    sh(["imgclf", "predict", "data/raw/fox", "-o", "shared.csv"], b, env=shared)
    expected = pd.read_csv(a_answers)
    assert pd.read_csv(b / "shared.csv").equals(expected)
    # The pulled files alone: the same Keras model that A registered.
    sh(["imgclf", "predict", "data/raw/fox", "--model", "models/model.keras", "-o", "own.csv"],
       b)
    own = pd.read_csv(b / "own.csv")
    assert list(own["label_1"]) == list(expected["label_1"])
    pd.testing.assert_frame_equal(own.filter(like="prob_"), expected.filter(like="prob_"),
                                  atol=1e-5)

    # A training experiment in B: `train` runs on A's stored features, and what follows it is
    # stale; the base's pass (`features`) and prepare never run.
    # (train.head_lr: with phase 2 off here, train.finetune_lr would change nothing, and
    # DVC would see the same outputs.)
    tried = sh(["dvc", "exp", "run", "-n", "b-lower-lr", "-S", "train.head_lr=0.003",
                "train"], b).stdout
    assert "Running stage 'train'" in tried
    assert "Running stage 'features'" not in tried and "Running stage 'prepare'" not in tried
    stale = set(json.loads(sh(["dvc", "status", "--with-deps", "evaluate", "--json"], b).stdout))
    assert stale == {"selective", "package", "register", "evaluate"}, stale

    sh(["dvc", "exp", "pull", "origin", "baseline"], b)
    # A's experiment was run on the commit before "baseline": shown with every commit's.
    shown = json.dumps(json.loads(sh(["dvc", "exp", "show", "--all-commits", "--json"],
                                     b).stdout))
    assert "baseline" in shown and "b-lower-lr" in shown
