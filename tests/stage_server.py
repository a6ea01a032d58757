"""Stage runs for tests without paying TensorFlow's import in every one.

`python -m stages.X` starts by importing TensorFlow, Keras and MLflow, several seconds of CPU
each time; a test suite runs stages dozens of times. One server process per pytest worker
imports them once and forks a child per stage run: the child changes to the run's folder,
takes the caller's environment, writes to its own stdout/stderr files and runs the module as
`-m` would (`imgclf.warm.run_as_main`, what the warm server's children run), so the
stage's code runs unchanged in a process of its own. A run whose environment changes what
those imports read (TF_*, KERAS_*, CUDA_*, ...: `imgclf.warm.IMPORT_TIME_PREFIXES`) gets a
plain fresh interpreter instead, as does every run when the server cannot start.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf.warm import IMPORT_TIME_PREFIXES  # what a forked child would not read anew

SERVER = r"""
import json, os, sys, threading
import imgclf  # its environment defaults and the quiet TensorFlow import, as a stage has
import tensorflow, keras, mlflow  # noqa: F401  the imports every child inherits

def run(request):
    fd_in = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd, target in ((fd_in, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    from imgclf.warm import run_as_main  # what the warm server's children run

    run_as_main(request["module"], request["args"], request["cwd"], request["env"])

replies = os.fdopen(int(sys.argv[1]), "w", buffering=1)
replies.write(json.dumps({"ready": threading.active_count()}) + "\n")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        replies.close()
        run(request)
    replies.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class StageServer:
    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.failed = False
        self.snapshot: dict[str, str] = {}

    def _start(self) -> bool:
        if self.failed:
            return False
        if self.proc is not None and self.proc.poll() is None:
            return True
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(write_fd)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True, env=env,
                                     pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies, self.pending = read_fd, b""
        ready = self._reply(timeout=300) or {}
        # A server with threads of its own would fork children missing them: not safe.
        if ready.get("ready") != 1:
            self.close()
            self.failed = True
            return False
        self.snapshot = _import_time_env(env)
        return True

    def usable_for(self, env: dict) -> bool:
        return self._start() and _import_time_env(env) == self.snapshot

    def run(self, module: str, cwd: Path, args: tuple[str, ...], env: dict,
            timeout: int) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"module": module, "args": list(args), "cwd": str(Path(cwd).resolve()),
                       "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(timeout=60)["pid"]
            done = self._reply(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise subprocess.TimeoutExpired([module, *args], timeout)
            code = done["returncode"]
            return subprocess.CompletedProcess(
                [sys.executable, "-m", module, *args], code,
                out.read_text(encoding="utf-8", errors="replace"),
                err.read_text(encoding="utf-8", errors="replace"))

    def _reply(self, timeout: float) -> dict | None:
        """The server's next reply line, or None when none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.replies], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.replies, 65536)
            if not chunk:
                return {}
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None


def _import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}
