"""The prepare stage on both layouts, messy folders, duplicates, and a split users can rely on."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import encode, make_class_folders, photo, run_module, set_params, write
from PIL import Image

from imgclf.data.dataset import assign_splits, prepare
from imgclf.errors import UserError
from imgclf.params import load_params


def run_prepare(root):
    result = run_module("stages.prepare", root)
    return result


def read_split(root, name):
    return pd.read_csv(root / "data/prepared" / f"{name}.csv")


def test_folder_layout_with_unicode_class_names(project):
    make_class_folders(project / "data/raw", {"Golden Retriever": 10, "Bichon Frisé": 10,
                                              "柴犬": 10})
    result = run_prepare(project)
    assert result.returncode == 0, result.stderr
    classes = json.loads((project / "data/prepared/classes.json").read_text())
    assert classes == sorted(["Golden Retriever", "Bichon Frisé", "柴犬"])
    frames = {name: read_split(project, name) for name in ("train", "val", "test")}
    assert list(frames["train"].columns)[:5] == ["path", "label", "sha256", "width", "height"]
    # Stratified, with cumulative cuts per class of 10: test round(1.5) = 2,
    # val round(3.0) - 2 = 1, train the other 7.
    expected = {"test": 2, "val": 1, "train": 7}
    for name, frame in frames.items():
        counts = frame["label"].value_counts().to_dict()
        assert counts == dict.fromkeys(classes, expected[name]), name
    assert "prepare: 30 images in 3 classes" in result.stdout


def test_messy_folder_every_skip_explained(project):
    raw = project / "data/raw"
    make_class_folders(raw, {"cat": 8, "dog": 8})
    img = photo(64, 64, seed=99)
    # odd but valid: all kept
    exif = Image.Exif()
    exif[0x0112] = 6
    write(raw / "cat/rotated.jpg", encode(photo(64, 40, 5), "JPEG", exif=exif.tobytes()))
    write(raw / "cat/grey.PNG", encode(img.convert("L")))
    write(raw / "cat/palette.gif", encode(photo(50, 50, 6).convert("P"), "GIF"))
    write(raw / "dog/alpha.webp", encode(photo(50, 50, 7).convert("RGBA"), "WEBP"))
    write(raw / "dog/cmyk.JPEG", encode(photo(50, 50, 8).convert("CMYK"), "JPEG"))
    write(raw / "dog/prog.jpg", encode(photo(50, 50, 9), "JPEG", progressive=True))
    write(raw / "dog/old.bmp", encode(photo(50, 50, 10), "BMP"))
    # bad: each skipped with its reason
    write(raw / "cat/empty.jpg", b"")
    write(raw / "cat/notes.jpg", b"not an image at all" * 20)
    full = encode(photo(120, 120, 11), "JPEG")
    write(raw / "dog/truncated.jpg", full[: len(full) // 2])
    write(raw / "dog/tiny.png", encode(photo(20, 20, 12)))
    write(raw / "dog/clip.mp4", b"\x00\x00\x00\x18ftypmp42")
    write(raw / "loose.png", encode(photo(50, 50, 13)))
    # noise: ignored silently
    write(raw / ".DS_Store", b"\x00")
    write(raw / "cat/Thumbs.db", b"\x00")
    write(raw / "dog/README.txt", b"hello")
    write(raw / "cat/.hidden.png", encode(photo(50, 50, 14)))
    params = load_params()
    splits, report = prepare(params, progress=False)
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "empty.jpg": "empty_file", "notes.jpg": "not_an_image", "truncated.jpg": "corrupt",
        "tiny.png": "too_small", "clip.mp4": "not_an_image_extension",
        "loose.png": "no_class_folder",
    }
    assert all(s["detail"] for s in report["skipped"] if s["reason"] != "empty_file")
    kept = {r["path"] for name in splits for r in splits[name]}
    odd = {"rotated.jpg", "grey.PNG", "palette.gif", "alpha.webp", "cmyk.JPEG", "prog.jpg",
           "old.bmp"}
    assert odd <= {p.split("/")[-1] for p in kept}
    assert len(kept) == 16 + 7
    rotated = next(r for name in splits for r in splits[name] if r["path"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (40, 64)


def test_too_large_images_skipped(project):
    make_class_folders(project / "data/raw", {"a": 5, "b": 5})
    write(project / "data/raw/a/huge.png", encode(photo(300, 300, 3)))
    set_params(project, prepare__max_pixels=64 * 48 * 2)
    _, report = prepare(load_params(), progress=False)
    assert [s["reason"] for s in report["skipped"]] == ["too_large"]


def test_duplicates_kept_once_and_conflicts_excluded(project):
    raw = project / "data/raw"
    make_class_folders(raw, {"a": 6, "b": 6})
    same = (raw / "a/img_000.png").read_bytes()
    write(raw / "a/z_copy.png", same)                       # duplicate in its own class
    conflict = (raw / "a/img_001.png").read_bytes()
    write(raw / "b/mislabelled.png", conflict)                 # same bytes under two labels
    splits, report = prepare(load_params(), progress=False)
    paths = {r["path"] for name in splits for r in splits[name]}
    assert "data/raw/a/img_000.png" in paths and "data/raw/a/z_copy.png" not in paths
    assert report["duplicates"][0]["dropped"] == ["data/raw/a/z_copy.png"]
    assert "data/raw/a/img_001.png" not in paths and "data/raw/b/mislabelled.png" not in paths
    assert report["conflicts"][0]["labels"] == ["a", "b"]
    assert sorted(s["reason"] for s in report["skipped"]) == ["label_conflict"] * 2


def test_kaggle_labels_csv_layout(project):
    raw = project / "data/raw"
    rows = []
    for i in range(18):
        breed = ["beagle", "pug", "boxer"][i % 3]
        ext = [".jpg", ".JPG", ".png"][i % 3]
        fmt = "PNG" if ext == ".png" else "JPEG"
        write(raw / "train" / f"id{i:02d}{ext}", encode(photo(60, 60, seed=i + 100), fmt))
        rows.append(f"id{i:02d},{breed}")
    rows.append("ghost,pug")                                   # listed, no file
    write(raw / "train/unlisted.jpg", encode(photo(60, 60, seed=500), "JPEG"))
    write(raw / "labels.csv", ("image,dog\n" + "\n".join(rows) + "\n").encode())
    set_params(project, data__labels_csv="data/raw/labels.csv", data__id_column="image",
               data__label_column="dog")
    result = run_prepare(project)
    assert result.returncode == 0, result.stderr
    report = json.loads((project / "reports/prepare.json").read_text())
    assert report["layout"] == "labels_csv"
    assert report["n_images"] == 18
    assert {s["reason"] for s in report["skipped"]} == {"missing_image", "not_in_labels_csv"}
    train = read_split(project, "train")
    assert set(train["label"]) == {"beagle", "pug", "boxer"}


def test_wrong_csv_column_is_a_clear_error(project):
    make_class_folders(project / "data/raw", {"a": 5, "b": 5})
    write(project / "data/raw/labels.csv", b"id,label\nx,a\n")
    set_params(project, data__labels_csv="data/raw/labels.csv")
    result = run_prepare(project)
    assert result.returncode == 2
    assert "data.label_column = 'breed' is not a column" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_runs_give_byte_identical_outputs(project):
    make_class_folders(project / "data/raw", {"x": 12, "y": 9, "z": 15})
    outputs = []
    for _ in range(2):
        assert run_prepare(project).returncode == 0
        outputs.append({p.name: p.read_bytes()
                        for p in sorted((project / "data/prepared").iterdir())})
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"train.csv", "val.csv", "test.csv", "classes.json"}


def test_split_ignores_file_names_and_adding_one_image_moves_at_most_one_per_cut():
    records = [{"path": f"p{i}", "label": "a" if i % 2 else "b", "sha256": f"{i:064x}"}
               for i in range(200)]
    before = assign_splits(records, val=0.15, test=0.2, seed=3)
    renamed = [{**r, "path": f"other/{r['path']}"} for r in reversed(records)]
    after_rename = assign_splits(renamed, val=0.15, test=0.2, seed=3)
    assert ({n: {r["sha256"] for r in before[n]} for n in before}
            == {n: {r["sha256"] for r in after_rename[n]} for n in after_rename})
    where = {r["sha256"]: n for n in before for r in before[n]}
    for extra in range(200, 230):  # many single additions, each compared to the base split
        added = records + [{"path": "new", "label": "a", "sha256": f"{extra:064x}"}]
        split = assign_splits(added, val=0.15, test=0.2, seed=3)
        now = {r["sha256"]: n for n in split for r in split[n]}
        moved = [(where[h], now[h]) for h in where if where[h] != now[h]]
        # cuts are test|val and val|train: at most one image crosses each
        assert sum({a, b} == {"test", "val"} for a, b in moved) <= 1
        assert sum({a, b} == {"val", "train"} for a, b in moved) <= 1
        assert not any({a, b} == {"test", "train"} for a, b in moved)


def test_seed_changes_the_split():
    records = [{"path": f"p{i}", "label": "ab"[i % 2], "sha256": f"{i:064x}"} for i in range(60)]
    one = assign_splits(records, 0.2, 0.2, seed=1)["test"]
    two = assign_splits(records, 0.2, 0.2, seed=2)["test"]
    assert {r["sha256"] for r in one} != {r["sha256"] for r in two}


def test_too_few_images_or_classes_exit_2(project):
    make_class_folders(project / "data/raw", {"a": 10, "b": 2})
    result = run_prepare(project)
    assert result.returncode == 2
    assert "'b' (2)" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data/prepared").exists()
    with pytest.raises(UserError, match="at least 2"):
        assign_splits([{"path": "p", "label": "a", "sha256": "0" * 64}] * 5, 0.2, 0.2, 0)


def test_missing_raw_dir_exit_2(project):
    result = run_prepare(project)
    assert result.returncode == 2
    assert "data.raw_dir = 'data/raw' is not a folder" in result.stderr


def test_failed_run_leaves_previous_outputs_intact(project):
    make_class_folders(project / "data/raw", {"a": 6, "b": 6})
    assert run_prepare(project).returncode == 0
    before = (project / "data/prepared/train.csv").read_bytes()
    for path in (project / "data/raw/b").iterdir():
        path.unlink()  # now only one class: prepare must fail without touching outputs
    assert run_prepare(project).returncode == 2
    assert (project / "data/prepared/train.csv").read_bytes() == before
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".")]
