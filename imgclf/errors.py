"""User-facing errors: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (bad params, missing data, no weights offline)."""

    exit_code = EXIT_USER_ERROR


class ServiceLost(Exception):
    """A service went away mid-work (the tracking server): one line, exit 1, nothing lost."""

    exit_code = 1


def exits_cleanly(func: F) -> F:
    """Wrap a stage's main(): a UserError prints one line and exits 2, a ServiceLost one line
    and exits 1; bugs still raise. A main() run as the program (`python -m stages.X`) that
    returns ends the process at once (`finish`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except (UserError, ServiceLost) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if func.__module__ == "__main__":
            finish()
        return result

    return wrapper  # type: ignore[return-value]


def finish(code: int = 0) -> None:
    """End the process with exit status `code` as the interpreter's own exit does (threads
    joined, atexit handlers run: MLflow's, logging's, multiprocessing's; output flushed),
    without then tearing down every module and object one at a time: after TensorFlow and a
    loaded network that teardown takes seconds and writes nothing (every output is already
    closed and renamed into place)."""
    import atexit
    import os
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what exit does first
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
