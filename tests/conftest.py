"""Fixtures that make tiny, real image folders in tmp_path."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stage_server import StageServer

ROOT = Path(__file__).resolve().parents[1]

# Stage commands run as plain processes here (imgclf/warm.py): a warm server each test's
# `dvc repro` started would outlive it. The suite's own server (stage_server.py) forks the
# stages it runs itself; tests/test_warm.py turns warm starts on where it tests them.
os.environ["IMGCLF_WARM"] = "0"


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A small RGB image with structure (gradients + noise), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, (seed * 37) % 256)], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def scene(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth random shapes of colour (a bicubic blow-up of a few
    random pixels) plus sensor-like noise. Unlike `photo`, whose images share one gradient,
    distinct seeds differ in their large-scale structure, as distinct photos do."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4 + seed % 4, 5 + seed % 3, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                       Image.Resampling.BICUBIC), dtype=int)
    noisy = smooth + rng.integers(-12, 13, size=smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


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


def free_ports(n: int = 1) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing listens on now (all held until all are
    known, so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_STAGES = StageServer(ROOT)


def run_module(module: str, cwd: Path, *args: str, timeout: int = 600):
    """`python -m module args` in `cwd`, as a completed process; forked from this worker's
    stage server (TensorFlow imported once: tests/stage_server.py) where it can be."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if _STAGES.usable_for(env):
        return _STAGES.run(module, cwd, args, env, timeout)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def pytest_sessionfinish(session, exitstatus):
    _STAGES.close()


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def sh_env(env: dict | None = None) -> dict:
    """The environment `sh` runs commands in: git identity, the venv's tools first on PATH."""
    import os

    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **GIT_ENV, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            **(env or {})}


def sh(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, env=None):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=sh_env(env))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A fresh git + DVC repository holding a copy of the project (code, dvc.yaml, params)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "MLproject",
                 "python_env.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("stages", "imgclf"):
        shutil.copytree(ROOT / package, repo / package,
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
    # mlflow.serving_format stays auto: package converts the TFLite copy whatever it is, and
    # serving from it spares evaluate and predict a Keras load. The OpenVINO copies are the
    # trained project's (tests/export, tests/serving): converting them costs every package.
    "package__openvino": [],
}


TINY_CLASSES = {"alpha": 7, "beta": 7, "gamma": 7}


def tiny_data(root: Path, **overrides) -> None:
    """The tiny project's images (TINY_CLASSES) in root/data/raw and its params.yaml: the
    project's own with TINY and `overrides` applied."""
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    make_class_folders(root / "data/raw", TINY_CLASSES)
    set_params(root, **{**TINY, **overrides})


def run_stages(root: Path, *modules: str) -> None:
    """Each stage module in `root`, in order; the first that fails fails the caller."""
    for module in modules:
        result = run_module(module, root)
        assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"


@pytest.fixture
def tiny_classifier():
    """A Keras classifier of 8x8 images into 2 classes, converted in seconds, with the
    `head_pool` layer every packaged format reads the pooled features from."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


@pytest.fixture
def prepared_project(project) -> Path:
    """A project with 3 classes x 7 images prepared, and params shrunk for speed."""
    tiny_data(project)
    run_stages(project, "stages.prepare")
    return project


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory) -> Path:
    """`prepared_project` with its features stored, made once per xdist worker: the features
    stage (a TensorFlow start-up and the base over every image) is the same for every test
    that trains on it, and a copy costs a fraction of a second. Its manifests and store name
    the images by relative path, so a copy is a project of its own."""
    root = tmp_path_factory.mktemp("tiny_template")
    tiny_data(root)
    run_stages(root, "stages.prepare", "stages.features")
    return root


@pytest.fixture
def tiny_project(project, _tiny_template) -> Path:
    """A project like `prepared_project` with its features stored (the features stage), ready
    to train: a copy of one made once per worker."""
    shutil.copytree(_tiny_template, project, dirs_exist_ok=True)
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


# The slowest tests, slowest first (pytest --durations).
LONGEST = ("test_readme_walkthrough", "test_team_server_with_auth",
           "test_bad_input_corpus_through_the_whole_pipeline",
           "test_kills_between_saving_and_logging", "test_training_killed_twice")

# Fixtures that run pipeline stages: a test using one is not a fast unit test.
PROJECT_FIXTURES = {"trained_project", "tiny_project", "prepared_project", "dvc_repo",
                    "digits_project", "_tiny_template"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group marks
def pytest_collection_modifyitems(config, items):
    """`make test` runs on pytest-xdist workers (`--dist loadgroup`). Every test that reads
    the session's trained project joins one group, so one worker trains it once; that group
    and then the slow tests go first, so the long ones do not end up last on one worker
    while the other idles."""
    for item in items:
        if "trained_project" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("trained_project"))
        if "digits_project" in item.fixturenames:  # tests/test_behaviour.py: built once
            item.add_marker(pytest.mark.xdist_group("digits_project"))
        if PROJECT_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.project)  # not in the fast tier (`make test-fast`)

    def rank(item) -> tuple[int, int]:
        if "trained_project" in item.fixturenames:
            return 0, 0
        if item.get_closest_marker("slow"):
            # The longest first (longest-processing-time order): started last, one of them
            # would keep a worker busy long after the other has run out of tests.
            longest = next((i for i, name in enumerate(LONGEST) if name in item.nodeid),
                           len(LONGEST))
            return 1, longest
        return 2, 0

    items.sort(key=rank)  # stable: within a rank, the files' own order


OOD_DIR = "ood"  # trained_project's images of another kind (evaluate.ood_dir)


def write_scenes(folder: Path, count: int, offset: int = 0) -> list[Path]:
    """`count` photo-like scenes (`scene`): images of none of `make_class_folders`' classes."""
    return [write(folder / f"scene_{i:03d}.png", encode(scene(96, 72, seed=offset + i)))
            for i in range(count)]


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """One tiny trained model for the whole session (75 px, random init, 3 classes).

    Tests that use it run stages in it (evaluate, export, predict); none retrains.
    """
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Its tests share one xdist group; a second worker building it again means the
        # grouping broke (as with pytest 9.2): ~2 minutes lost, so say it loudly.
        claim = tmp_path_factory.getbasetemp().parent / "trained_project.claimed"
        try:
            claim.open("x").close()
        except FileExistsError:
            pytest.fail("a second xdist worker builds trained_project: `--dist loadgroup` is "
                        "not grouping its tests (see the pytest pin in pyproject.toml)")
    root = tmp_path_factory.mktemp("trained")
    tiny_data(root, export__tflite=["float32", "dynamic", "int8"], evaluate__ood_dir=OOD_DIR,
              package__openvino=["float", "int8"])
    write_scenes(root / OOD_DIR, 12, offset=500)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("MLFLOW_")}
    try:
        run_stages(root, "stages.prepare", "stages.augment_preview", "stages.features",
                   "stages.train", "stages.selective", "stages.package", "stages.register")
    finally:
        os.environ.update(saved)
    return root


def png_header_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small PNG whose header claims width x height (400 Mpx): refused from the header, it
    says "too_large"; decoded, it would say "corrupt" (its pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


BAD_INPUT_CLASSES = ("golden retriever", "Bichon Frisé", "柴犬")


def write_bad_input_corpus(raw: Path) -> dict:
    """Every odd and broken kind of file `prepare` handles, in class folders whose names have
    spaces and non-ASCII letters. Returns {"valid": [kept paths], "skipped": {path: reason},
    "ignored": [paths nobody reports], "duplicate": path, "conflict": [paths]}."""
    a, b, c = BAD_INPUT_CLASSES
    make_class_folders(raw, dict.fromkeys(BAD_INPUT_CLASSES, 7))
    valid = [str(p.relative_to(raw.parent.parent)) for p in sorted(raw.rglob("*.png"))]
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo(50, 50, 40), photo(50, 50, 41)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    odd = {
        f"{a}/rotated.jpg": encode(photo(64, 40, 30), "JPEG", exif=exif.tobytes()),
        f"{a}/grey.PNG": encode(photo(64, 64, 31).convert("L")),
        f"{a}/palette.gif": encode(photo(50, 50, 32).convert("P"), "GIF"),
        f"{a}/sixteen bit.png": encode(sixteen),
        f"{b}/alpha.webp": encode(photo(50, 50, 33).convert("RGBA"), "WEBP"),
        f"{b}/cmyk.JPEG": encode(photo(50, 50, 34).convert("CMYK"), "JPEG"),
        f"{b}/grey alpha.png": encode(photo(50, 50, 35).convert("LA")),
        f"{c}/prog.jpg": encode(photo(50, 50, 36), "JPEG", progressive=True),
        f"{c}/old.bmp": encode(photo(50, 50, 37), "BMP"),
        f"{c}/animated.gif": animated.getvalue(),
    }
    full = encode(photo(120, 120, 38), "JPEG")
    bad = {
        f"{a}/empty.jpg": (b"", "empty_file"),
        f"{a}/notes.jpg": (b"not an image at all" * 20, "not_an_image"),
        f"{b}/truncated.jpg": (full[: len(full) // 2], "corrupt"),
        f"{b}/tiny.png": (encode(photo(20, 20, 39)), "too_small"),
        f"{c}/clip.mp4": (b"\x00\x00\x00\x18ftypmp42", "not_an_image_extension"),
        f"{c}/bomb.png": (png_header_bomb(), "too_large"),
        "loose.png": (encode(photo(50, 50, 43)), "no_class_folder"),
    }
    for rel, data in odd.items():
        write(raw / rel, data)
    for rel, (data, _) in bad.items():
        write(raw / rel, data)
    write(raw / ".DS_Store", b"\x00")
    write(raw / a / "Thumbs.db", b"\x00")
    write(raw / b / "README.txt", b"hello")
    write(raw / a / "z copy.png", (raw / a / "img_000.png").read_bytes())    # duplicate
    write(raw / c / "mislabelled.png", (raw / b / "img_001.png").read_bytes())  # conflict
    prefix = f"{raw.parent.name}/{raw.name}"
    conflict = [f"{prefix}/{b}/img_001.png", f"{prefix}/{c}/mislabelled.png"]
    valid = [v for v in valid if v not in conflict] + [f"{prefix}/{rel}" for rel in odd]
    return {"valid": sorted(valid), "duplicate": f"{prefix}/{a}/z copy.png",
            "conflict": conflict,
            "skipped": {f"{prefix}/{rel}": reason for rel, (_, reason) in bad.items()}}
