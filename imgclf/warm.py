"""Warm stage starts: the heavy libraries imported once per `dvc repro`, not once per stage.

`python -m stages.X` spends seconds of CPU before the stage's first line of work importing
TensorFlow (Keras with it), MLflow, scikit-learn and pandas, and every stage of a pipeline
pays that again. The first stage run that finds no warm server starts one and runs as a
plain process; the server imports those libraries once, then forks a child for each later
stage run. The child takes the run's working folder, environment, umask, arguments and
standard streams (passed over the socket, so it writes where the command would), and runs
the stage's module as `-m` would: the stage's code runs unchanged, in a process of its own,
and imports imgclf's own modules fresh from disk. The command itself waits for the child,
passes on the signals it gets (Ctrl-C, a kill by DVC) and exits with the child's status; if
the command dies, the server kills the child. The server ends after IDLE_SECONDS without a
run.

- `IMGCLF_WARM=0` turns it off: every stage imports its libraries itself.
- A run whose environment changes what those imports read (`IMPORT_TIME_PREFIXES`: TF_*,
  KERAS_*, CUDA_*, ..., the locale), another Python, other installed libraries or another
  copy of the project gets a server of its own (`_key`).
- A run that finds no server, or one that does not answer, runs as a plain process.
- `IMGCLF_WARM_DIR` sets where the servers' sockets live (default: a folder of this user's
  under XDG_RUNTIME_DIR or the temporary folder).
- `IMGCLF_WARM_PEAK_FILE`: where the command writes its child's peak memory (KB), which is
  not the command's own (`make bench` reads it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

IDLE_SECONDS = 120  # a server with no run for this long ends
STARTING_WAIT_SECONDS = 60  # how long a run waits for a server that is still importing
IMPORT_TIME_PREFIXES = ("TF_", "KERAS_", "CUDA_", "OMP_", "PYTHON", "XLA_", "LD_", "LC_",
                        "LANG")
# The libraries the server imports for its children: what the stages import before their
# work (imgclf first: its environment defaults and TensorFlow's quiet import), and what
# MLflow imports only once a stage opens its store (the embedded SQLite one) or loads a
# model as it serves. Not OpenVINO: its import starts a thread (see `serve`).
PRELOAD = ("imgclf", "tensorflow", "keras", "mlflow", "sklearn.metrics", "sklearn.covariance",
           "sklearn.neighbors", "pandas", "matplotlib.pyplot",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
           "sqlalchemy.dialects.sqlite", "alembic.config", "mlflow.pyfunc.loaders")
_HEADER = struct.Struct("!Q")


def _folder() -> Path:
    base = os.environ.get("IMGCLF_WARM_DIR") or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"imgclf-warm-{os.getuid()}")
    folder = Path(base)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    return folder


def _key(env: dict[str, str]) -> str:
    """What a child inherits from the server where a fresh process would read it anew: the
    Python, the installed libraries (their modification times), this imgclf (its folder: a
    `dvc exp run --temp` copy is another; the modules the server imports, their content) and
    the environment's import-time variables."""
    here = Path(__file__).parent
    installed = Path(sysconfig.get_paths()["purelib"])
    parts = [sys.executable, sys.version, str(here), *sys.path[1:]]
    for name in ("tensorflow", "keras", "mlflow", "sklearn", "pandas", "matplotlib"):
        init = installed / name / "__init__.py"
        parts.append(f"{name}:{init.stat().st_mtime_ns if init.exists() else 0}")
    for own in ("__init__.py", "_quiet.py", "warm.py"):
        parts.append(hashlib.sha256((here / own).read_bytes()).hexdigest())
    parts += sorted(f"{k}={v}" for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _stage_command() -> tuple[str, list[str]] | None:
    """(module, arguments) when this process is `python -m stages.X ...` with no interpreter
    option, else None."""
    argv = getattr(sys, "orig_argv", [])
    if len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith("stages."):
        return None
    return argv[2], argv[3:]


def hand_over() -> None:
    """Run this stage command (`python -m stages.X`) in a child of the warm server and exit
    with its status; return when it is to run here instead (no server, warm starts off, not
    a stage command). Called first thing by the `stages` package."""
    command = _stage_command()
    if command is None or os.environ.get("IMGCLF_WARM", "1") == "0":
        return
    try:
        folder = _folder()
        key = _key(dict(os.environ))
        conn = _connect(folder / f"{key}.sock") or _start_or_wait(folder, key)
    except OSError:
        return
    if conn is None:
        return
    module, args = command
    request = {"module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ),
               "umask": _umask()}
    replies = conn.makefile("rb")  # the child's id, then its status: lines
    try:
        payload = json.dumps(request).encode()
        socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
        conn.sendall(payload)
        reply = _read_line(replies)
    except OSError:
        reply = None
    if not reply or "pid" not in reply:
        conn.close()
        return  # nothing ran: the stage runs here
    child = reply["pid"]

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    status = _read_line(replies)
    if status is None:
        print("error: the warm server stopped while it ran this stage (IMGCLF_WARM=0 runs "
              "stages without it)", file=sys.stderr)
        os._exit(1)
    if peak_file := os.environ.get("IMGCLF_WARM_PEAK_FILE"):
        Path(peak_file).write_text(str(status["maxrss_kb"]))
    if status["signal"]:
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
    os._exit(status["code"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_or_wait(folder: Path, key: str) -> socket.socket | None:
    """A server for `key` that is starting, waited for; if none is, one started (detached:
    it outlives this run) and None (this run goes on as a plain process)."""
    if (folder / f"{key}.refused").exists():
        return None  # a server for this environment could not be made safe: never again
    with open(folder / f"{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a server holds it: starting, or serving, or ending
            deadline = time.monotonic() + STARTING_WAIT_SECONDS
            while time.monotonic() < deadline:
                if conn := _connect(folder / f"{key}.sock"):
                    return conn
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    time.sleep(0.1)
                    continue
                return None  # it ended without serving
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
    subprocess.Popen([sys.executable, "-m", "imgclf.warm", str(folder), key],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return None


def _read_line(replies) -> dict | None:
    """The server's next reply, or None if the connection ended first."""
    try:
        line = replies.readline()
    except OSError:
        return None
    return json.loads(line) if line.endswith(b"\n") else None


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    if len(header) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("a malformed request")
    size, = _HEADER.unpack(header)
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("the request ended early")
        payload += chunk
    return json.loads(payload), fds


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage command's process, run the module, exit."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGCHLD):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                      else signal.SIG_DFL)
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.umask(request["umask"])
    # The server's own stream objects, now on the run's descriptors, buffered as a fresh
    # interpreter buffers them: stdout line by line only to a terminal, stderr always.
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    run_as_main(request["module"], request["args"], request["cwd"], request["env"])


def run_as_main(module: str, args: list[str], cwd: str, env: dict[str, str]) -> None:
    """`python -m module args` run in `cwd` with environment `env` by this process, a child
    forked from a server that imported imgclf and the libraries (here, and the test
    suite's own, tests/stage_server.py); ends the process with its exit status, as the
    interpreter's exit would (`errors.finish`)."""
    import importlib
    import runpy
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    importlib.reload(sys.modules["imgclf"])  # its environment defaults, on this run's
    sys.argv = [module, *args]
    sys.path[0] = cwd  # `python -m` puts the working folder first
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    from imgclf.errors import finish

    finish(code)


def serve(folder: Path, key: str) -> None:
    """The server for `key`: at most one (the lock), listening once its imports are done and
    no thread of its own runs (a child forked from a process with Python threads would miss
    them); a child per request; ends after IDLE_SECONDS without a run."""
    import importlib
    import threading

    lock = open(folder / f"{key}.lock", "a")  # noqa: SIM115  held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server for this key
    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:
        # A library started a thread at its import: a forked child would lack it. Runs stay
        # plain for this environment instead of starting a server each time.
        (folder / f"{key}.refused").write_text(f"{threading.active_count()} threads\n")
        return
    path = folder / f"{key}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while children or time.monotonic() - last < IDLE_SECONDS:
            for selected, _ in selector.select(timeout=0.05 if children else 1.0):
                if selected.fileobj is listener:
                    conn, _ = listener.accept()
                    if pid := _start_child(conn, [lock, listener, selector, *children.values()]):
                        children[pid] = conn
                        selector.register(conn, selectors.EVENT_READ)
                    last = time.monotonic()
                else:  # the command's connection: anything but its end is ignored
                    conn = selected.fileobj
                    try:
                        ended = not conn.recv(1)
                    except OSError:
                        ended = True
                    if ended:
                        pid = next(p for p, c in children.items() if c is conn)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        selector.unregister(conn)
            while children:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                if not pid:
                    break
                conn = children.pop(pid)
                with contextlib.suppress(KeyError):
                    selector.unregister(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({
                        "code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
                        else 1,
                        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                        "maxrss_kb": usage.ru_maxrss}).encode() + b"\n")
                conn.close()
                last = time.monotonic()
    finally:
        path.unlink(missing_ok=True)
        listener.close()


def _start_child(conn: socket.socket, servers_own: list) -> int | None:
    """A child for the request on `conn` (from this user only), its id sent back on `conn`;
    the child's id, or None when none runs. `servers_own`: what the child closes first (the
    lock, the listening socket, the selector, the other commands' connections)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        if uid != os.getuid():
            raise ConnectionError("another user")
        conn.settimeout(10)  # a command that connects and sends nothing holds no one up
        request, fds = _recv_request(conn)
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for own in [*servers_own, conn]:
            own.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:  # the command is gone: so is its stage
        os.kill(pid, signal.SIGKILL)
    # Registered either way: the child is reaped, and its connection closed, with the rest.
    return pid


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
