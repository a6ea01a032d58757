"""File outputs, all atomic: a stage killed half-way leaves the old output or none."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary name ends with `path`'s own name, so writers that insist on a suffix
    (Keras: `.keras`, `.weights.h5`) accept it. On error it is removed and `path` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def csv_text(frame) -> str:
    """A DataFrame as the CSV every stage writes: no index, \n line ends (the same bytes on
    every OS, so DVC hashes agree), floats to 6 significant digits."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n", float_format="%.6g")
    return buffer.getvalue()


def write_csv(path: str | Path, frame) -> None:
    write_text(path, csv_text(frame))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or {} when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `path` in one rename.

    On error the staging folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Fault injection for the kill tests: IMGCLF_KILL_AT=saved:1 SIGKILLs the process at the
# point that names itself `saved` with 1 (train: right after epoch 1's resume state was saved).
KILL_AT = "IMGCLF_KILL_AT"


def fault_point(event: str, at: int | str = "") -> None:
    if os.environ.get(KILL_AT) == f"{event}:{at}":
        import signal
        import sys

        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
