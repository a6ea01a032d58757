"""What the conversion jobs (`openvino_job`, `tflite_job`) share: they end with their parent,
and they end without Python's normal exit."""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable


def _exit_at_end_of_input() -> None:
    sys.stdin.buffer.read()  # returns at end of file: the parent closed the pipe or died
    os._exit(3)


def wait_for_input() -> None:
    """Returns once the parent writes a line on standard input (the job's input is whole);
    ends the job with exit code 3 if it closes first (the parent failed, or died)."""
    if not sys.stdin.buffer.readline():
        os._exit(3)


def run(work: Callable[[], None]) -> None:
    """`work()`, ended with exit code 3 as soon as standard input closes (the package stage
    holds it open while it waits for the job: a parent that dies, even by SIGKILL, takes the
    job along instead of leaving it converting into a staging path nobody reads); exit code
    1 and the traceback if it raises, else 0."""
    threading.Thread(target=_exit_at_end_of_input, daemon=True).start()
    code = 0
    try:
        work()
    except BaseException:
        traceback.print_exc()
        code = 1
    # Not a normal interpreter exit: it would wait on the thread's read of stdin, still
    # blocked while the parent holds the pipe open, and abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
