"""The leakage gate: near-duplicate copies of one photo never straddle train, val and test."""

from __future__ import annotations

import json
from io import BytesIO

import numpy as np
import pandas as pd
import pytest
from conftest import encode, run_module, scene, set_params, write
from PIL import Image

from imgclf.data import leakage
from imgclf.data.leakage import near_duplicate_groups, perceptual_hash


def _copy(img: Image.Image) -> bytes:
    """What scrapers produce: the same photo resized and re-saved as a lossy JPEG."""
    bigger = img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.Resampling.BICUBIC)
    return encode(bigger, "JPEG", quality=80)


def _scenes(raw, classes: dict[str, int]) -> None:
    seed = 0
    for label, count in classes.items():
        for i in range(count):
            seed += 1
            write(raw / label / f"img_{i:03d}.png", encode(scene(seed=seed)))


def _split_of(root) -> dict[str, str]:
    return {path: name for name in ("train", "val", "test")
            for path in pd.read_csv(root / f"data/prepared/{name}.csv")["path"]}


def test_groups_copies_and_not_distinct_photos():
    originals = [scene(seed=s) for s in range(1, 40)]
    hashes = [perceptual_hash(img) for img in originals]
    copies = [perceptual_hash(Image.open(BytesIO(_copy(img))))
              for img in originals[:5]]
    groups = near_duplicate_groups(hashes + copies, max_distance=4)
    assert sorted(sorted(g) for g in groups) == [[i, 39 + i] for i in range(5)]


@pytest.mark.parametrize("merge_at", [leakage._MERGE_AT, 0])
def test_grouping_across_comparison_blocks_is_exact(monkeypatch, merge_at):
    """Thousands of distinct hashes (several comparison blocks), with copies placed far apart
    and one chain: exactly the copies are grouped, the chain as one group, whether the pairs
    merge into components at once or block by block (as millions of pairs do)."""
    monkeypatch.setattr(leakage, "_MERGE_AT", merge_at)
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, 3000, dtype=np.int64)]
    values[2500] = values[10] ^ 0b11  # 2 bits from image 10
    values[1500] = values[20] ^ 0b1111  # 4 bits from image 20...
    values[2999] = values[1500] ^ (0b1111 << 8)  # ...and 4 more from that copy: a chain
    hashes = [f"{v:016x}" for v in values]
    assert sorted(sorted(g) for g in near_duplicate_groups(hashes, 4)) == [
        [10, 2500], [20, 1500, 2999]]


def test_resized_reencoded_copies_land_in_their_originals_split(project):
    raw = project / "data/raw"
    _scenes(raw, {"cat": 20, "dog": 20})
    originals = sorted(raw.glob("*/*.png"))
    # A copy beside many originals: with 40 images and 30% held out, a copy split on its
    # own hash lands in another split than its original more often than not.
    for original in originals[::3]:
        write(original.with_name(f"{original.stem}_copy.jpg"), _copy(Image.open(original)))

    def splits_of_pairs() -> list[tuple[str, str]]:
        where = _split_of(project)
        return [(where[f"data/raw/{o.parent.name}/{o.name}"],
                 where[f"data/raw/{o.parent.name}/{o.stem}_copy.jpg"]) for o in originals[::3]]

    set_params(project, prepare__near_duplicate_distance=None)
    assert run_module("stages.prepare", project).returncode == 0
    assert any(a != b for a, b in splits_of_pairs()), "copies never straddled: test too weak"

    set_params(project, prepare__near_duplicate_distance=4)
    result = run_module("stages.prepare", project)
    assert result.returncode == 0, result.stderr
    assert all(a == b for a, b in splits_of_pairs()), splits_of_pairs()
    report = json.loads((project / "reports/prepare.json").read_text())
    groups = report["near_duplicate_groups"]
    assert len(groups) == len(originals[::3])
    assert all(len(g["paths"]) == 2 and not g["label_conflict"] for g in groups)
    assert f"near-duplicates {len(groups)} group(s) of {2 * len(groups)} images" in result.stdout


def test_near_duplicate_under_another_label_is_a_reported_conflict(project):
    raw = project / "data/raw"
    _scenes(raw, {"cat": 8, "dog": 8})
    original = raw / "cat/img_000.png"
    write(raw / "dog/looks_like_a_cat.jpg", _copy(Image.open(original)))
    result = run_module("stages.prepare", project)
    assert result.returncode == 0, result.stderr
    report = json.loads((project / "reports/prepare.json").read_text())
    [group] = report["near_duplicate_groups"]
    assert group["label_conflict"] and group["excluded"] and group["labels"] == ["cat", "dog"]
    assert group["paths"] == ["data/raw/cat/img_000.png", "data/raw/dog/looks_like_a_cat.jpg"]
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped["data/raw/dog/looks_like_a_cat.jpg"] == "near_duplicate_label_conflict"
    assert "suspected label conflicts 1 (excluded" in result.stdout
    assert "data/raw/cat/img_000.png" not in _split_of(project)

    set_params(project, prepare__near_duplicate_conflicts="keep")
    assert run_module("stages.prepare", project).returncode == 0
    where = _split_of(project)
    assert where["data/raw/cat/img_000.png"] == where["data/raw/dog/looks_like_a_cat.jpg"]
