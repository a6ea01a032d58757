"""The features stage runs the base on images it has not stored only: a relabel costs no
forward pass, new images cost theirs, and train refuses a store made for other data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import TINY, encode, make_class_folders, photo, run_module, set_params, sh, write


def _stored_shas(project: Path) -> set[str]:
    """The images whose features the stage keeps: train and val (test is never stored)."""
    return {sha for split in ("train", "val")
            for sha in pd.read_csv(project / f"data/prepared/{split}.csv")["sha256"]}


def _run(module: str, project: Path) -> dict:
    result = run_module(module, project)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((project / "data/features/meta.json").read_text()) \
        if module == "stages.features" else {}


def _pooled_by_sha(project: Path) -> dict[str, np.ndarray]:
    store = project / "data/features"
    with np.load(store / "rows.npz") as ids:
        shas, views = ids["sha256"].tolist(), ids["view"].tolist()
    pooled = np.load(store / "pooled.npy")
    return {sha: pooled[i] for i, (sha, view) in enumerate(zip(shas, views, strict=True))
            if view == 0}


def _features_without_reading(project: Path, shas: set[str]) -> dict:
    """The features stage run while every raw image with one of `shas` holds garbage (its
    bytes put back after): had the base been run on one of them, the stage would fail to
    decode it. Its meta."""
    manifests = pd.concat([pd.read_csv(project / f"data/prepared/{s}.csv")
                           for s in ("train", "val", "test")])
    saved = {}
    try:
        for path, sha in zip(manifests["path"], manifests["sha256"], strict=True):
            if sha in shas:
                saved[project / path] = (project / path).read_bytes()
                (project / path).write_bytes(b"not an image any more")
        return _run("stages.features", project)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_the_base_runs_on_the_images_it_has_not_stored_only(prepared_project):
    project = prepared_project
    first = _run("stages.features", project)
    stored = _stored_shas(project)
    assert first["computed_rows"] == len(stored) and first["kept_rows"] == 0
    before = _pooled_by_sha(project)

    # A relabel (an image moved to another class folder) and a deletion: no forward pass,
    # but for an image the split may move from test (never stored) into val.
    raw = project / "data/raw"
    moved = sorted((raw / "alpha").iterdir())[0]
    shutil.move(moved, raw / "beta" / f"was_alpha_{moved.name}")
    sorted((raw / "gamma").iterdir())[0].unlink()
    _run("stages.prepare", project)
    from_test = _stored_shas(project) - stored
    assert len(from_test) <= 1
    relabelled = _features_without_reading(project, stored)
    assert relabelled["computed_rows"] == len(from_test)
    assert relabelled["kept_rows"] == len(_stored_shas(project) & stored)

    # New images: only they (and what the split moved out of test) go through the base;
    # every other row is the stored one, as it was.
    stored = _stored_shas(project)
    for i in range(5):
        write(raw / f"gamma/new_{i}.png", encode(photo(70, 52, seed=9000 + i)))
    _run("stages.prepare", project)
    expected_new = _stored_shas(project) - stored
    assert expected_new
    grown = _features_without_reading(project, stored)
    assert grown["computed_rows"] == len(expected_new)
    assert grown["kept_rows"] == len(_stored_shas(project) & stored)
    after = _pooled_by_sha(project)
    assert set(after) == _stored_shas(project)  # nothing unreferenced is kept
    for sha in _stored_shas(project) & set(before):
        np.testing.assert_array_equal(after[sha], before[sha])

    # The store now belongs to these manifests: other data (a training image renamed)
    # without rerunning the stage is refused by train, in one line, as a stale store was.
    renamed = project / pd.read_csv(project / "data/prepared/train.csv")["path"][0]
    renamed.rename(renamed.with_name(f"renamed_{renamed.name}"))
    _run("stages.prepare", project)
    refused = run_module("stages.train", project)
    assert refused.returncode == 2, refused.stderr[-2000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert "data/features" in message and "features stage again" in message


def test_a_store_made_under_another_key_is_not_reused(prepared_project):
    project = prepared_project
    _run("stages.features", project)
    set_params(project, model__resize="pad")  # another image -> features mapping
    again = _run("stages.features", project)
    assert again["kept_rows"] == 0 and again["computed_rows"] == len(_stored_shas(project))


def test_dvc_keeps_the_store_in_place_when_the_data_grows(dvc_repo):
    repo = dvc_repo
    make_class_folders(repo / "data/raw", {"cat": 5, "dog": 5, "fox": 5})
    set_params(repo, **TINY)
    sh(["dvc", "repro", "features"], repo)
    stored = _stored_shas(repo)
    for i in range(2):
        write(repo / f"data/raw/fox/new_{i}.png", encode(photo(64, 48, seed=8000 + i)))
    out = sh(["dvc", "repro", "features"], repo).stdout
    assert "Running stage 'features'" in out
    meta = json.loads((repo / "data/features/meta.json").read_text())
    assert meta["kept_rows"] == len(_stored_shas(repo) & stored) > 0
    assert meta["computed_rows"] == len(_stored_shas(repo) - stored)
    assert "Running stage" not in sh(["dvc", "repro", "features"], repo).stdout
