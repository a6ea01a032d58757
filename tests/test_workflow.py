"""The README walkthrough, end to end, in a temporary git + DVC repository; and docs/team.md's
second clone of it.

Photos -> dvc add -> dvc repro -> two experiments (one through `mlflow run -e train`, one
in a temporary copy) -> compare -> promote the better of the two registered versions -> a
promote of the worse refused -> rollback -> predict from @production (through `mlflow run
-e predict`).

The team's half, on the same run (its pipeline is the expensive part): the repository
pushed to a bare git origin and a local-folder DVC remote (a real remote type: S3 or SSH
differ only in `dvc remote add`), with its experiment; clone B pulls: nothing is stale,
`dvc repro` runs nothing, a training experiment reruns `train` but never `features`, B's
predictions are A's (from A's registered model through a shared store), and A's experiment
shows in B.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, make_class_folders, set_params, sh, sh_env
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_readme_walkthrough(dvc_repo):
    repo = dvc_repo
    make_class_folders(repo / "data/raw", {"cat": 7, "dog": 7, "fox": 7})
    # Phase 2 is not what this walks through; without it each of the three trainings is ~20 s
    # shorter (its first step traces the whole network's gradient).
    set_params(repo, **{**TINY, "train__finetune_epochs": 0})
    sh(["dvc", "add", "data/raw"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data and tiny params"], repo)

    # A second `dvc repro` while the first runs is refused by DVC's lock; the first finishes.
    first_proc = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=repo, env=sh_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (repo / "reports/prepare.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = sh(["dvc", "repro", "evaluate"], repo, check=False)
    assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()
    first_out, _ = first_proc.communicate(timeout=900)
    assert first_proc.returncode == 0, first_out[-3000:]
    for stage in ("prepare", "augment_preview", "features", "train", "selective", "package",
                  "register", "evaluate"):
        assert f"Running stage '{stage}'" in first_out
    assert "Running stage" not in sh(["dvc", "repro", "evaluate"], repo).stdout
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "accuracy" in json.dumps(shown) and "n_test" in json.dumps(shown)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline"], repo)
    clone = share_and_clone(repo)

    # What does not change the training does not retrain: the preview's params and the
    # plotting code rerun the preview and evaluate (which draws the curves); the registered
    # name, the serving format and the serving code register again; none of them trains.
    set_params(repo, augment__preview_images=3, augment__seed=11,
               mlflow__model_name="dogs", mlflow__serving_format="keras")
    for edited in ("imgclf/plots.py", "imgclf/serving/runners.py"):
        with (repo / edited).open("a") as code:
            code.write("\n# restyled\n")
    stale = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
    assert {"augment_preview", "register", "evaluate"} <= set(stale), stale
    assert not {"features", "train"} & set(stale), stale
    sh(["git", "checkout", "params.yaml", "imgclf/plots.py", "imgclf/serving/runners.py"], repo)

    # Two experiments. The first through the MLproject's train entry point, which logs into
    # the run `mlflow run` opens (no empty wrapper run) and runs through evaluate; the second
    # in a temporary copy under .dvc/tmp/exps/, which must still log to the repository's own
    # MLflow store (its training is the part that logs from the copy; the stages after it
    # log through the same store as the first experiment's).
    mlflow_run = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "imgclf"]
    sh([*mlflow_run, "-e", "train", "--run-name", "lr-high", "-P", "head_lr=0.05",
        "-P", "image_size=75", "-P", "weights=null", "-P", "batch_size=4",
        "-P", "head_epochs=1", "-P", "finetune_epochs=0"], repo)
    low = sh(["dvc", "exp", "run", "--temp", "-n", "lr-low", "-S", "train.head_lr=0.001",
              "train"], repo)
    # A training param: the base's pass over every image (the features stage) is reused.
    assert "Running stage 'train'" in low.stdout
    assert "Running stage 'features'" not in low.stdout
    table = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout))
    assert "0.05" in table and "lr-low" in table
    assert sh(["dvc", "metrics", "diff", "HEAD"], repo).returncode == 0

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert {"lr-high", "lr-low"} <= set(by_name) and len(runs) == 3
    assert by_name["lr-low"].data.params["train.head_lr"] == "0.001"
    assert by_name["lr-high"].data.params["train.head_lr"] == "0.05"
    assert by_name["lr-high"].data.tags["mlflow.project.entryPoint"] == "train"
    assert "test_accuracy" in by_name["lr-high"].data.metrics
    assert "val_accuracy" in by_name["lr-low"].data.metrics  # trained in the temp copy
    sh(["dvc", "exp", "push", "origin", "lr-low"], repo)

    # The baseline's version and lr-high's, each with its test metrics.
    versions = {str(v.version): v.run_id for v in client.search_model_versions("name='imgclf'")}
    assert len(versions) == 2 and by_name["lr-high"].info.run_id in versions.values()
    loss = {version: client.get_run(run_id).data.metrics["test_log_loss"]
            for version, run_id in versions.items()}
    better, worse = sorted(loss, key=loss.get)
    assert loss[better] < loss[worse]

    def imgclf(*args, check=True):
        return sh(["imgclf", *args], repo, check=check)

    assert "test_accuracy" in imgclf("models").stdout
    imgclf("promote", "--version", worse, "--metric", "test_log_loss")
    imgclf("promote", "--version", better, "--metric", "test_log_loss")
    refused = imgclf("promote", "--version", worse, "--metric", "test_log_loss", check=False)
    assert refused.returncode == 1 and f"stays on {better}" in refused.stderr
    production = client.get_model_version_by_alias("imgclf", "production")
    assert str(production.version) == better
    assert production.tags["audit.from_version"] == worse

    imgclf("rollback")
    assert str(client.get_model_version_by_alias("imgclf", "production").version) == worse

    out = repo / "predictions.csv"
    imgclf("predict", "data/raw/fox", "--output", str(out))  # default: @production
    frame = pd.read_csv(out)
    assert len(frame) == 7 and set(frame["label_1"]) <= {"cat", "dog", "fox"}

    # The entry points with their empty defaults (the newest version; @production), each
    # recording what it did in the run `mlflow run` opened.
    sh([*mlflow_run, "-e", "promote", "--run-name", "promote-newest",
        "-P", "metric=test_log_loss", "-P", "min_delta=100"], repo, check=False)
    sh([*mlflow_run, "-e", "predict", "--run-name", "predict-fox", "-P", "paths=data/raw/fox",
        "-P", "output=entry.csv"], repo)
    assert pd.read_csv(repo / "entry.csv").equals(frame)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("imgclf").experiment_id])}
    assert runs["promote-newest"].data.tags["imgclf.command"] == "promote"
    assert runs["promote-newest"].data.tags["imgclf.promoted"] == "false"  # min_delta 100
    assert runs["predict-fox"].data.tags["imgclf.images"] == "7"
    artifacts = [a.path for a in client.list_artifacts(runs["predict-fox"].info.run_id)]
    assert artifacts == ["entry.csv"]

    second_clone_works_from_the_remote(repo, clone, frame)


def share_and_clone(repo: Path) -> Path:
    """A's state pushed to a bare git origin and a local-folder DVC remote; B cloned from the
    origin and pulled: nothing stale, nothing to run. B's folder."""
    origin, remote, clone = repo.parent / "origin.git", repo.parent / "dvc-remote", \
        repo.parent / "b"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], repo.parent)
    sh(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    sh(["git", "commit", "-q", "-am", "the team's DVC remote"], repo)
    sh(["dvc", "push"], repo)
    sh(["git", "remote", "add", "origin", str(origin)], repo)
    sh(["git", "push", "-q", "origin", "main"], repo)

    sh(["git", "clone", "-q", str(origin), str(clone)], repo.parent)
    started = time.monotonic()
    # A ran the pipeline up to evaluate: B pulls that far (after a whole `dvc repro`, plain
    # `dvc pull` and `dvc status` do).
    sh(["dvc", "pull", "--with-deps", "evaluate"], clone)
    assert json.loads(sh(["dvc", "status", "--with-deps", "evaluate", "--json"],
                         clone).stdout) == {}
    assert "Running stage" not in sh(["dvc", "repro", "evaluate"], clone).stdout
    print(f"B: dvc pull + dvc status + dvc repro {time.monotonic() - started:.1f} s")
    return clone


def second_clone_works_from_the_remote(repo: Path, clone: Path, production: pd.DataFrame):
    # A's registered model, through the store A logged to (a team tracking server's part).
    # The pulled files are A's baseline byte for byte: `dvc status` above found every
    # output at the hash A's dvc.lock records.
    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    sh(["imgclf", "predict", "data/raw/fox", "-o", "shared.csv"], clone, env=shared)
    assert pd.read_csv(clone / "shared.csv").equals(production)

    # A training experiment in B: `train` runs on A's stored features and what follows it
    # is stale; the base's pass (`features`) and prepare never run.
    tried = sh(["dvc", "exp", "run", "-n", "b-head-lr", "-S", "train.head_lr=0.003", "train"],
               clone).stdout
    assert "Running stage 'train'" in tried
    assert "Running stage 'features'" not in tried and "Running stage 'prepare'" not in tried
    stale = set(json.loads(sh(["dvc", "status", "--with-deps", "evaluate", "--json"],
                              clone).stdout))
    assert stale == {"selective", "package", "register", "evaluate"}, stale
    sh(["dvc", "exp", "pull", "origin", "lr-low"], clone)
    shown = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], clone).stdout))
    assert "lr-low" in shown and "b-head-lr" in shown
