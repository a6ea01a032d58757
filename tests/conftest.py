"""Fixtures that make tiny, real image folders in tmp_path."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A small RGB image with structure (gradients + noise), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, (seed * 37) % 256)], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folders(raw: Path, classes: dict[str, int], size=(64, 48), offset=0) -> None:
    """`classes` maps a class name to its image count; every image is unique."""
    seed = offset
    for label, count in classes.items():
        for i in range(count):
            seed += 1
            write(raw / label / f"img_{i:03d}.png", encode(photo(*size, seed=seed * 7919)))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of the project's params.yaml in a temp dir, which becomes the cwd."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(root: Path, **overrides) -> None:
    """Override params.yaml keys given as section__key=value."""
    from ruamel.yaml import YAML

    yaml = YAML()
    path = root / "params.yaml"
    data = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split("__", 1)
        data[section][key] = value
    with path.open("w") as handle:
        yaml.dump(data, handle)


def run_module(module: str, cwd: Path, *args: str, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def sh(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, env=None):
    import os

    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **GIT_ENV, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
                **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A fresh git + DVC repository holding a copy of the project (code, dvc.yaml, params)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "init"], repo)
    return repo


TINY = {  # the shrunk real run every training test starts from
    "model__image_size": 75, "model__weights": None, "train__batch_size": 4,
    "train__head_epochs": 1, "train__finetune_epochs": 1, "train__head_lr": 0.01,
    "augment__preview_images": 2, "augment__preview_views": 2,
}


@pytest.fixture
def tiny_project(project) -> Path:
    """A project with 3 classes x 7 images prepared, and params shrunk for speed."""
    make_class_folders(project / "data/raw", {"alpha": 7, "beta": 7, "gamma": 7})
    set_params(project, **TINY)
    result = run_module("stages.prepare", project)
    assert result.returncode == 0, result.stderr
    return project


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI in os.environ; without this,
    one test's store would leak into the stages that later tests start as subprocesses."""
    import os

    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """One tiny trained model for the whole session (75 px, random init, 3 classes).

    Tests that use it run stages in it (evaluate, export, predict); none retrains.
    """
    import os

    root = tmp_path_factory.mktemp("trained")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    make_class_folders(root / "data/raw", {"alpha": 7, "beta": 7, "gamma": 7})
    set_params(root, **TINY, export__tflite=["float32", "dynamic"])
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("MLFLOW_")}
    try:
        for module in ("stages.prepare", "stages.augment_preview", "stages.train"):
            result = run_module(module, root)
            assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
    finally:
        os.environ.update(saved)
    return root
