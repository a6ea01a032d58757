"""DVC stage `prepare`: validate every image, drop duplicates, split train/val/test.

Reads params sections data, prepare, split. Writes data/prepared/{train,val,test}.csv,
data/prepared/classes.json and reports/prepare.json.
"""

from __future__ import annotations

from imgclf import io, paths
from imgclf.data.dataset import prepare, summary
from imgclf.data.manifests import write_prepared
from imgclf.errors import exits_cleanly
from imgclf.params import load_params


@exits_cleanly
def main() -> None:
    params = load_params()
    splits, report = prepare(params)
    write_prepared(splits, sorted(report["classes"]))
    io.write_json(paths.PREPARE_REPORT, report)
    print(summary(report))


if __name__ == "__main__":
    main()
