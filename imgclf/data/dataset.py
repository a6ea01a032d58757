"""From a folder of labelled photos to clean, deduplicated, split image records.

Pure functions over lists of records (dicts), so each step is testable without a pipeline:
`find_candidates` (both layouts) -> `inspect_all` (decode in parallel) -> `deduplicate`
-> `assign_splits`; `prepare` runs them all for the stage and `summary` says what happened.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from imgclf import paths
from imgclf.data.images import ImageRejected, inspect_and_decode, is_ignored, is_image_name
from imgclf.data.leakage import diameter, near_duplicate_groups, perceptual_hash
from imgclf.errors import UserError
from imgclf.params import Params
from imgclf.paths import SPLITS


def _rel(path: Path) -> str:
    """Manifest paths relative to the project root when under it, so a repo copy still works."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _walk(root: Path) -> Iterator[Path]:
    """Files under root in a stable order, skipping hidden folders (.git, .dvc, __MACOSX)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _skip(path: Path | str, reason: str, detail: str = "") -> dict:
    return {"path": path if isinstance(path, str) else _rel(path), "reason": reason,
            "detail": detail}


def find_candidates_folders(raw_dir: Path) -> tuple[list[dict], list[dict]]:
    """Layout (a): one sub-folder per class; the class is the folder's name, as written."""
    candidates, skipped = [], []
    for path in _walk(raw_dir):
        if is_ignored(path):
            continue
        parts = path.relative_to(raw_dir).parts
        if len(parts) < 2:
            skipped.append(_skip(path, "no_class_folder", "file directly in data.raw_dir"))
        elif not is_image_name(path):
            skipped.append(_skip(path, "not_an_image_extension", path.suffix or "no extension"))
        else:
            candidates.append({"path": path, "label": parts[0]})
    return candidates, skipped


def find_candidates_csv(
    raw_dir: Path, labels_csv: Path, id_column: str, label_column: str
) -> tuple[list[dict], list[dict]]:
    """Layout (b), Kaggle dog-breed: `id,breed` rows and images `<id>.<ext>` under raw_dir."""
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise UserError(f"data.labels_csv = {str(labels_csv)!r} cannot be read: {err}") from None
    for column, key in ((id_column, "data.id_column"), (label_column, "data.label_column")):
        if column not in table.columns:
            raise UserError(
                f"{key} = {column!r} is not a column of {labels_csv} "
                f"(columns: {', '.join(table.columns)})"
            )
    by_stem: dict[str, list[Path]] = defaultdict(list)
    skipped: list[dict] = []
    for path in _walk(raw_dir):
        if is_ignored(path):
            continue
        if not is_image_name(path):
            skipped.append(_skip(path, "not_an_image_extension", path.suffix or "no extension"))
            continue
        by_stem[path.stem].append(path)

    labels_of: dict[str, set[str]] = defaultdict(set)
    for image_id, label in zip(table[id_column], table[label_column], strict=True):
        image_id, label = image_id.strip(), label.strip()
        if not image_id:
            continue
        if not label:
            skipped.append(_skip(f"{labels_csv.name}:{image_id}", "empty_label"))
            continue
        labels_of[image_id].add(label)

    candidates = []
    for image_id in sorted(labels_of):
        labels = labels_of[image_id]
        paths = by_stem.pop(image_id, [])
        if not paths:
            skipped.append(_skip(f"{labels_csv.name}:{image_id}", "missing_image",
                                 f"no {image_id}.<ext> under {raw_dir}"))
        elif len(labels) > 1:
            for path in paths:
                skipped.append(_skip(path, "label_conflict",
                                     f"labels.csv gives {', '.join(sorted(labels))}"))
        elif len(paths) > 1:
            for path in paths:
                skipped.append(_skip(path, "ambiguous_id",
                                     f"{len(paths)} files share the id {image_id}"))
        else:
            candidates.append({"path": paths[0], "label": next(iter(labels))})
    for paths in by_stem.values():
        for path in paths:
            skipped.append(_skip(path, "not_in_labels_csv"))
    return candidates, skipped


def _inspect(job: tuple[Path, str, int, int, bool]) -> dict:
    path, label, max_pixels, min_side, with_hash = job
    try:
        info, decoded = inspect_and_decode(path, max_pixels, min_side, grey=True)
    except ImageRejected as err:
        return _skip(path, err.reason, err.detail)
    record = {"path": _rel(path), "label": label, "sha256": info.sha256,
              "width": info.width, "height": info.height}
    if with_hash:
        record["phash"] = perceptual_hash(decoded)
    return record


def inspect_all(
    candidates: list[dict], max_pixels: int, min_side: int, workers: int = 0,
    progress: bool = True, perceptual_hashes: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Decode every candidate fully, in parallel; return (records, skipped) in input order.
    With `perceptual_hashes`, each record also gets its `phash` (the leakage gate's)."""
    jobs = [(c["path"], c["label"], max_pixels, min_side, perceptual_hashes)
            for c in candidates]
    workers = workers or os.cpu_count() or 1
    results: Iterable[dict]
    bar = dict(total=len(jobs), unit="img", desc="prepare", disable=not progress, smoothing=0.1)
    if workers == 1 or len(jobs) < 64:
        results = tqdm(map(_inspect, jobs), **bar)
        records, skipped = _partition(results)
    else:
        if perceptual_hashes:
            # Imported once here, before the workers fork, not once in each of them
            # (imagehash's DCT is scipy's, a slow import). The grouping needs scipy anyway.
            import imagehash  # noqa: F401
            import scipy.fftpack  # noqa: F401
            import scipy.sparse.csgraph  # noqa: F401
        # Chunks amortise inter-process overhead; results stream back in order, so memory
        # holds only the small record dicts, never pixels.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = tqdm(pool.map(_inspect, jobs, chunksize=32), **bar)
            records, skipped = _partition(results)
    return records, skipped


def _partition(results: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    records, skipped = [], []
    for result in results:
        (skipped if "reason" in result else records).append(result)
    return records, skipped


def deduplicate(records: list[dict]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Exact duplicates by content hash.

    Same bytes in one class: kept once (the first path in sorted order). Same bytes under
    two labels: a label conflict, every copy excluded. Returns (kept, duplicates, conflicts,
    skipped) where skipped has one entry per excluded conflicting file.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["sha256"]].append(record)
    kept, duplicates, conflicts, skipped = [], [], [], []
    for digest, group in groups.items():
        group = sorted(group, key=lambda r: r["path"])
        labels = sorted({r["label"] for r in group})
        if len(labels) > 1:
            paths = [r["path"] for r in group]
            conflicts.append({"sha256": digest, "labels": labels, "paths": paths})
            skipped += [_skip(r["path"], "label_conflict",
                              f"same image labelled {', '.join(labels)}") for r in group]
            continue
        kept.append(group[0])
        if len(group) > 1:
            duplicates.append({"sha256": digest, "label": labels[0], "kept": group[0]["path"],
                               "dropped": [r["path"] for r in group[1:]]})
    kept.sort(key=lambda r: (r["label"], r["path"]))
    return kept, duplicates, conflicts, skipped


def group_near_duplicates(records: list[dict], max_distance: int | None,
                          conflicts: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Near-duplicate groups among `records` (exact duplicates already removed).

    Each record of a group gets the group's number (`near_duplicate_group`), which
    `assign_splits` keeps in one split. A group spanning two labels is a suspected label
    conflict: with `conflicts="exclude"` its images are skipped. Returns (records,
    groups for the report, skipped).
    """
    if max_distance is None:
        return records, [], []
    found = near_duplicate_groups([r["phash"] for r in records], max_distance)
    report, excluded, skipped = [], set(), []
    for number, members in enumerate(sorted(found, key=lambda g: records[g[0]]["path"])):
        group = sorted((records[i] for i in members), key=lambda r: r["path"])
        labels = sorted({r["label"] for r in group})
        conflict = len(labels) > 1
        entry = {"group": number, "labels": labels, "paths": [r["path"] for r in group],
                 "max_distance": diameter([r["phash"] for r in group]),
                 "label_conflict": conflict,
                 "excluded": conflict and conflicts == "exclude"}
        report.append(entry)
        if entry["excluded"]:
            excluded.update(members)
            skipped += [_skip(r["path"], "near_duplicate_label_conflict",
                              f"near-duplicate labelled {', '.join(labels)}") for r in group]
        else:
            for i in members:
                records[i] = {**records[i], "near_duplicate_group": number}
    kept = [r for i, r in enumerate(records) if i not in excluded]
    return kept, report, skipped


def _split_key(seed: int, sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def _cut(n: int, fraction: float) -> int:
    return math.floor(n * fraction + 0.5)


def assign_splits(records: list[dict], val: float, test: float, seed: int) -> dict[str, list]:
    """Stratified split that depends only on image content, the fractions and the seed.

    Within a class, images are ordered by hash(seed, sha256); the first `test` fraction is
    test, the next `val` fraction is val, the rest train. The cuts are cumulative
    (round(n*test), round(n*(test+val))), so adding one image moves each cut by at most
    one place: at most one existing image changes split per cut.

    Near-duplicates (records sharing `near_duplicate_group`) move as one unit: the unit takes
    the place of its first member in that order (and its class), and all of it goes to the
    split where that place falls. A lone image is a unit of one, split as above.
    """
    units: dict[object, list[dict]] = defaultdict(list)
    for record in records:
        group = record.get("near_duplicate_group")
        units[("group", group) if group is not None else ("image", id(record))].append(record)
    by_class: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for members in units.values():
        first = min(members, key=lambda r: _split_key(seed, r["sha256"]))
        by_class[first["label"]].append((_split_key(seed, first["sha256"]), members))
    if len(by_class) < 2:
        raise UserError(
            f"only {len(by_class)} class(es) left after validation "
            f"({', '.join(by_class) or 'none'}): a classifier needs at least 2"
        )
    splits: dict[str, list] = {name: [] for name in SPLITS}
    too_small = []
    for label in sorted(by_class):
        ordered = sorted(by_class[label], key=lambda unit: unit[0])
        n = sum(len(members) for _, members in ordered)
        cut_test = max(1, _cut(n, test))
        cut_val = max(cut_test + 1, _cut(n, test + val))
        if cut_val >= n:
            too_small.append(f"{label!r} ({n})")
            continue
        place = 0
        for _, members in ordered:
            name = "test" if place < cut_test else "val" if place < cut_val else "train"
            splits[name] += members
            place += len(members)
        if place - len(ordered[-1][1]) < cut_val:  # one group ran from val or test to the end
            too_small.append(f"{label!r} ({n}, near-duplicates of one photo fill every split)")
    if too_small:
        listed = ", ".join(too_small[:5]) + (" ..." if len(too_small) > 5 else "")
        raise UserError(
            f"{len(too_small)} class(es) have too few images for at least one in each of "
            f"train, val and test: {listed}. Add images (3 is the minimum; 10+ is sensible) "
            "or remove those class folders"
        )
    for name in SPLITS:
        splits[name].sort(key=lambda r: (r["label"], r["path"]))
    return splits


def class_counts(splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        for label, count in Counter(r["label"] for r in splits[name]).items():
            counts.setdefault(label, dict.fromkeys(SPLITS, 0))[name] = count
    return dict(sorted(counts.items()))


def prepare(params: Params, progress: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """Run the whole stage in memory: returns (splits, report)."""
    data = params.data
    raw_dir = Path(data.raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"data.raw_dir = {data.raw_dir!r} is not a folder: put your images "
                        "there (one sub-folder per class) or set data.raw_dir")
    if data.labels_csv:
        labels_csv = Path(data.labels_csv)
        if not labels_csv.is_file():
            raise UserError(f"data.labels_csv = {data.labels_csv!r} does not exist "
                            "(set it to null for the one-folder-per-class layout)")
        candidates, skipped = find_candidates_csv(raw_dir, labels_csv, data.id_column,
                                                  data.label_column)
    else:
        candidates, skipped = find_candidates_folders(raw_dir)
    if not candidates:
        raise UserError(f"no images found under data.raw_dir = {data.raw_dir!r} "
                        f"({len(skipped)} file(s) skipped)")
    gate = params.prepare.near_duplicate_distance
    records, rejected = inspect_all(candidates, params.prepare.max_pixels,
                                    params.prepare.min_side, params.prepare.workers, progress,
                                    perceptual_hashes=gate is not None)
    kept, duplicates, conflicts, conflicted = deduplicate(records)
    kept, near, near_conflicted = group_near_duplicates(
        kept, gate, params.prepare.near_duplicate_conflicts)
    skipped = sorted(skipped + rejected + conflicted + near_conflicted,
                     key=lambda s: (s["reason"], s["path"]))
    splits = assign_splits(kept, params.split.val, params.split.test, params.split.seed)
    report = {
        "layout": "labels_csv" if data.labels_csv else "folders",
        "n_candidates": len(candidates),
        "n_images": len(kept),
        "n_classes": len(class_counts(splits)),
        "split_sizes": {name: len(splits[name]) for name in SPLITS},
        "classes": class_counts(splits),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "duplicates": duplicates,
        "conflicts": conflicts,
        "near_duplicate_distance": params.prepare.near_duplicate_distance,
        "near_duplicate_groups": _with_splits(near, splits),
    }
    return splits, report


def _with_splits(groups: list[dict], splits: dict[str, list[dict]]) -> list[dict]:
    """Each kept group with the split it went to (one, by construction)."""
    where = {r["path"]: name for name in SPLITS for r in splits[name]}
    return [{**g, "split": None if g["excluded"] else where.get(g["paths"][0])} for g in groups]


def summary(report: dict) -> str:
    sizes = report["split_sizes"]
    lines = [
        f"prepare: {report['n_images']} images in {report['n_classes']} classes "
        f"({report['layout']} layout)",
        f"  split  train {sizes['train']}  val {sizes['val']}  test {sizes['test']}",
    ]
    per_class = sorted((sum(c.values()), label) for label, c in report["classes"].items())
    if per_class:
        lines.append(f"  class sizes  smallest {per_class[0][0]} ({per_class[0][1]})  "
                     f"largest {per_class[-1][0]} ({per_class[-1][1]})")
    dropped = sum(len(d["dropped"]) for d in report["duplicates"])
    lines.append(f"  duplicates dropped {dropped}  label conflicts {len(report['conflicts'])}")
    groups = report.get("near_duplicate_groups", [])
    if report.get("near_duplicate_distance") is not None:
        conflicted = [g for g in groups if g["label_conflict"]]
        lines.append(
            f"  near-duplicates {len(groups)} group(s) of {sum(len(g['paths']) for g in groups)}"
            f" images, each kept in one split; suspected label conflicts {len(conflicted)}"
            + (f" ({'excluded' if conflicted[0]['excluded'] else 'kept'}, e.g. "
               f"{' vs '.join(conflicted[0]['paths'][:2])})" if conflicted else ""))
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])} file(s):")
        for reason, count in report["skipped_by_reason"].items():
            example = next(s for s in report["skipped"] if s["reason"] == reason)
            lines.append(f"    {reason:<24}{count:>6}   e.g. {example['path']}")
        lines.append(f"  every skip with its reason: {paths.PREPARE_REPORT}")
    else:
        lines.append("  skipped 0 files")
    return "\n".join(lines)
