"""DVC stage `prepare`: validate every image, drop duplicates, split train/val/test.

Reads params sections data, prepare, split. Writes data/prepared/{train,val,test}.csv,
data/prepared/classes.json and reports/prepare.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from stages import atomic, paths
from stages.dataset import (
    MANIFEST_COLUMNS,
    SPLITS,
    assign_splits,
    class_counts,
    deduplicate,
    find_candidates_csv,
    find_candidates_folders,
    inspect_all,
)
from stages.errors import UserError, exits_cleanly
from stages.params import Params, load_params


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
    records, rejected = inspect_all(candidates, params.prepare.max_pixels,
                                    params.prepare.min_side, params.prepare.workers, progress)
    kept, duplicates, conflicts, conflicted = deduplicate(records)
    skipped = sorted(skipped + rejected + conflicted, key=lambda s: (s["reason"], s["path"]))
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
    }
    return splits, report


def manifest_csv(records: list[dict]) -> str:
    return atomic.csv_text(pd.DataFrame(records, columns=MANIFEST_COLUMNS))


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
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])} file(s):")
        for reason, count in report["skipped_by_reason"].items():
            example = next(s for s in report["skipped"] if s["reason"] == reason)
            lines.append(f"    {reason:<24}{count:>6}   e.g. {example['path']}")
        lines.append(f"  every skip with its reason: {paths.PREPARE_REPORT}")
    else:
        lines.append("  skipped 0 files")
    return "\n".join(lines)


@exits_cleanly
def main() -> None:
    params = load_params()
    splits, report = prepare(params)
    classes = sorted(report["classes"])
    with atomic.replaced_dir(paths.PREPARED_DIR) as staging:
        for name in SPLITS:
            (staging / f"{name}.csv").write_text(manifest_csv(splits[name]), encoding="utf-8")
        (staging / "classes.json").write_text(
            json.dumps(classes, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    atomic.write_json(paths.PREPARE_REPORT, report)
    print(summary(report))


if __name__ == "__main__":
    main()
