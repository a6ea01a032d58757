"""Warm stage starts (imgclf/warm.py): a stage command runs in a child of a server that has
imported the libraries once, and behaves as the plain process would, or runs as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # the server imports TensorFlow: not the fast tier

# A stage module of the test's own: what it saw, then what it was asked to do.
PROBE = '''
import json, os, sys, time
from imgclf.errors import UserError, exits_cleanly

started_with_tensorflow = "tensorflow" in sys.modules


@exits_cleanly
def main():
    what = sys.argv[1]
    print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                      "probe": os.environ.get("PROBE"), "umask": os.umask(0o22),
                      "warm": started_with_tensorflow}), flush=True)
    print("to stderr", file=sys.stderr)
    if what == "user_error":
        raise UserError("params.yaml: probe.value = 3 is not allowed")
    if what == "crash":
        raise RuntimeError("a bug")
    if what == "sleep":
        time.sleep(120)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder laid out as the project (imgclf, stages/ with its __init__) plus
    stages/probe.py, and a warm-server folder of its own; the servers it started are
    stopped at the end."""
    root = tmp_path_factory.mktemp("warm")
    (root / "imgclf").symlink_to(ROOT / "imgclf")
    (root / "stages").mkdir()
    (root / "stages" / "__init__.py").write_text((ROOT / "stages/__init__.py").read_text())
    (root / "stages" / "probe.py").write_text(PROBE)
    warm_dir = root / "servers"
    yield root, warm_dir
    subprocess.run(["pkill", "-f", f"imgclf.warm {warm_dir}"], check=False)


def _env(warm_dir: Path, **extra: str) -> dict:
    return {**os.environ, "IMGCLF_WARM": "1", "IMGCLF_WARM_DIR": str(warm_dir),
            "PYTHONPATH": "", **extra}


def _probe(root: Path, env: dict, *args: str,
           umask: int = 0o022) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "stages.probe", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120, umask=umask)
    seen = json.loads(proc.stdout.splitlines()[0]) if proc.stdout else {}
    return proc, seen


def _served(root: Path, env: dict, *args: str,
            umask: int = 0o022) -> tuple[subprocess.CompletedProcess, dict]:
    """The probe run once the server for `env` is up (the first run starts it and runs
    plain; the server imports its libraries, then listens)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        proc, seen = _probe(root, env, *args, umask=umask)
        if seen.get("warm"):
            return proc, seen
        time.sleep(1)
    raise AssertionError("no warm server answered in 120 s")


def test_a_stage_runs_in_a_warm_child_as_its_command_would_run_it(project):
    root, warm_dir = project
    env = _env(warm_dir, PROBE="from the command")
    plain, seen = _probe(root, env, "ok", "--flag")
    # No server yet: this run starts one and runs as a plain process.
    assert plain.returncode == 0 and seen["warm"] is False, plain.stderr
    # Another umask than the run that started the server (and the server) had.
    proc, seen = _served(root, env, "ok", "--flag", umask=0o077)
    assert proc.returncode == 0, proc.stderr
    # Another process (the server's child), with TensorFlow already imported, that took the
    # command's folder, arguments, environment and umask and wrote to its streams.
    assert seen["warm"] is True
    assert seen["cwd"] == str(root)
    assert seen["argv"] == ["ok", "--flag"]
    assert seen["probe"] == "from the command"
    assert seen["umask"] == 0o077
    assert seen["pid"] != os.getpid()
    assert proc.stderr.strip().splitlines()[-1] == "to stderr"


def test_the_stage_s_exit_status_comes_back_to_its_command(project):
    root, warm_dir = project
    env = _env(warm_dir)
    proc, seen = _served(root, env, "user_error")
    # A user's mistake: exit code 2 and one line, no traceback.
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: probe.value = 3 is not allowed")
    assert "Traceback" not in proc.stderr
    proc, _ = _served(root, env, "crash")
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr


def _started(root: Path, env: dict, *args: str) -> tuple[subprocess.Popen, int]:
    """The probe started served, with its stage's process id once it has printed it."""
    _served(root, env, "ok")
    command = subprocess.Popen([sys.executable, "-m", "stages.probe", *args], cwd=root,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seen = json.loads(command.stdout.readline())
    assert seen["warm"] is True and seen["pid"] != command.pid
    return command, seen["pid"]


def _gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_reaches_the_stage_and_a_killed_command_takes_its_stage_along(project):
    root, warm_dir = project
    env = _env(warm_dir)
    command, stage = _started(root, env, "sleep")
    command.send_signal(signal.SIGINT)
    # The stage saw the interrupt itself: its own message and exit code.
    assert command.wait(timeout=30) == 130
    assert "interrupted" in command.stderr.read()
    assert _gone(stage)

    command, stage = _started(root, env, "sleep")
    command.kill()  # as a killed `dvc repro` leaves it: no signal to pass on
    command.wait(timeout=30)
    assert _gone(stage), "the stage outlived its command"


def test_warm_starts_off_run_the_stage_in_its_own_process(project):
    root, warm_dir = project
    env = _env(warm_dir)
    _served(root, env, "ok")  # a server is up
    proc, seen = _probe(root, {**env, "IMGCLF_WARM": "0"}, "ok")
    assert proc.returncode == 0 and seen["warm"] is False
    # What TensorFlow reads at its import differs: not that server's children.
    servers = set(warm_dir.glob("*.sock"))
    proc, seen = _probe(root, {**env, "TF_ENABLE_ONEDNN_OPTS": "0"}, "ok")
    assert proc.returncode == 0 and seen["warm"] is False
    assert len(servers) == 1
