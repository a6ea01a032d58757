"""Where stages read and write. dvc.yaml names the same paths (tests check they agree)."""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
CLASSES_JSON = PREPARED_DIR / "classes.json"
REPORTS_DIR = Path("reports")
PREPARE_REPORT = REPORTS_DIR / "prepare.json"


def manifest(split: str) -> Path:
    return PREPARED_DIR / f"{split}.csv"
