"""TensorFlow's import-time lines that TF_CPP_MIN_LOG_LEVEL cannot silence.

TensorFlow 2.21 writes "All log messages before absl::InitializeLog() ..." and "oneDNN custom
operations are on ..." to the process's stderr (file descriptor 2, from C++) twice while
`import tensorflow` runs, before absl's log level is read. Every stage would open with four
lines about TensorFlow instead of its own output. The first import of tensorflow in the
process runs with fd 2 captured; what it wrote goes back to stderr without those known lines,
so a real import error or warning still shows. TF_CPP_MIN_LOG_LEVEL=0 turns this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

CHATTER = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "Could not find cuda drivers on your machine",
)


@contextmanager
def _stderr_without_chatter() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(True)
                    if not any(marker in line for marker in CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.inner  # later tools see TensorFlow's own loader
        with _stderr_without_chatter():
            self.inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the first import is the one that talks
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
