"""`make bench` times the pipeline as users run it: one `dvc repro`, each stage's seconds and
peak memory its own, adding up to the whole run."""

from __future__ import annotations

import subprocess
import time

from conftest import ROOT

from benchmarks.run import _pipeline_run, _versioned

# Two stages in the order DVC must run them (`second` reads what `first` writes): `first`
# sleeps, `second` sleeps longer and holds a large buffer.
DVC_YAML = """stages:
  first:
    cmd: python -m stages.first
    outs: [a.txt]
  second:
    cmd: python -m stages.second
    deps: [a.txt]
    outs: [b.txt]
"""
FIRST = "import time\ntime.sleep(1.5)\nopen('a.txt', 'w').write('a')\n"
SECOND = ("import time\nbuffer = bytearray(300 * 2**20)\n"
          "buffer[::4096] = b'x' * len(buffer[::4096])\ntime.sleep(3)\n"
          "open('b.txt', 'w').write(open('a.txt').read() + 'b')\n")


def test_one_dvc_repro_gives_each_stage_its_own_seconds_and_peak(tmp_path):
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "stages/__init__.py").write_text("")
    (repo / "stages/first.py").write_text(FIRST)
    (repo / "stages/second.py").write_text(SECOND)
    _versioned(repo)

    start = time.perf_counter()
    # Listed in the other order: the run's own order decides which seconds are whose.
    ran = _pipeline_run(repo, tmp_path / "work", ("second", "first"))
    whole = time.perf_counter() - start

    assert (repo / "b.txt").read_text() == "ab"  # DVC ran both, in order
    assert 1.5 <= ran["first"]["seconds"] < 1.5 + 3  # its own sleep, not the next one's
    assert ran["second"]["seconds"] >= 3
    assert sum(r["seconds"] for r in ran.values()) <= whole
    assert sum(r["seconds"] for r in ran.values()) >= whole - 1.0  # nothing left out
    assert ran["second"]["peak_rss_mb"] >= 300
    assert ran["first"]["peak_rss_mb"] < 100


def test_a_stage_run_by_the_warm_server_reports_its_own_peak(tmp_path, monkeypatch):
    # As users run it, a stage after the first runs in a child of the warm server
    # (imgclf/warm.py), not in the command the bench times: its peak must still be its own.
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "imgclf").symlink_to(ROOT / "imgclf")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "stages/__init__.py").write_text((ROOT / "stages/__init__.py").read_text())
    (repo / "stages/first.py").write_text(FIRST)
    (repo / "stages/second.py").write_text(
        SECOND + "import sys\nopen('served.txt', 'w').write(str('tensorflow' in sys.modules))\n")
    (repo / ".gitignore").write_text("/imgclf\n/served.txt\n")
    _versioned(repo)
    servers = tmp_path / "servers"
    monkeypatch.setenv("IMGCLF_WARM", "1")
    monkeypatch.setenv("IMGCLF_WARM_DIR", str(servers))
    try:
        # `first` starts the server and runs as a plain process; `second` waits for it.
        ran = _pipeline_run(repo, tmp_path / "work", ("first", "second"))
    finally:
        subprocess.run(["pkill", "-f", f"imgclf.warm {servers}"], check=False)
    assert (repo / "served.txt").read_text() == "True"
    assert ran["second"]["peak_rss_mb"] >= 300
