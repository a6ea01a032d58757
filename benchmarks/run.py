"""`make bench`: side-by-side measurements, reported as ratios, written to reports/bench.json.

Every comparison runs both ways in this one process, on the same data and seed, so the
ratio holds on a shared or noisy machine where absolute times do not. Sizes are flags; the
defaults finish in about 15 minutes on 2 CPU cores.

    python -m benchmarks.run [--only NAME ...] [--size 75] [--epochs 10] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.render import EARLIER  # noqa: E402
from imgclf import io  # noqa: E402


def _digits_project(root: Path, per_class: int | None, size: int = 96) -> Path:
    """A project folder with the demo digits prepared (real images, no network)."""
    from imgclf.data.demo import write_digits

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    write_digits(root / "data/raw", size=size, limit_per_class=per_class)
    _run([sys.executable, "-m", "stages.prepare"], root)
    return root


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT),
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result


def _overridden(root: Path, overrides: dict, yaml):
    """params.yaml of `root` with dotted overrides applied (`model.image_size`: 150)."""
    raw = yaml.load((root / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


def _params(root: Path, **overrides):
    from ruamel.yaml import YAML

    from imgclf.params import validate

    return validate(_overridden(root, overrides, YAML(typ="safe")))


def _write_params(root: Path, **overrides) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: the comments stay
    raw = _overridden(root, overrides, yaml)
    with (root / "params.yaml").open("w") as handle:
        yaml.dump(raw, handle)


# ------------------------------------------------------------------ frozen phase


def bench_frozen_phase(work: Path, args) -> dict:
    """Phase 1 for N epochs: frozen base inside fit every epoch vs cached features.

    Each way runs in a fresh process on the same prepared data and seed: in one process the
    second way inherits the first one's memory and thread state (measured: extraction 1.5x
    slower after a plain fit in the same process).
    """
    root = _digits_project(work / "frozen", args.per_class)
    results = {}
    for way in ("plain", "cached"):
        out = _run([sys.executable, "-m", "benchmarks.run", "--frozen-way", way,
                    "--size", str(args.size), "--epochs", str(args.epochs)], root)
        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    train_images = results["cached"].pop("train_images")
    results["plain"].pop("train_images")
    return {"frozen_phase_speedup": round(results["plain"]["seconds"]
                                          / results["cached"]["seconds"], 2),
            "frozen_phase": {**results, "epochs": args.epochs, "image_size": args.size,
                             "train_images": train_images}}


def frozen_way(way: str, args) -> dict:
    """One way of phase 1 in this process (cwd: a prepared project), as the train stage runs
    it: the stage's phase-1 function with its per-epoch resume-state writes, timed from the
    built model to the last epoch's checkpoint."""
    import keras

    from imgclf.data.manifests import read_classes
    from imgclf.model.network import build_classifier
    from imgclf.training.phases import Tracker, TrackerState, run_head_phase
    from imgclf.training.session import make_data, resume_saver

    root = Path.cwd()
    # No augmentation, so both ways see exactly the same inputs every epoch.
    params = _params(root, **{"model.image_size": args.size, "model.weights": None,
                              "train.head_lr": 0.01, "train.head_epochs": args.epochs,
                              "train.early_stopping_patience": 0,
                              "features.cache": way == "cached",
                              "augment.flip": "none", "augment.rotation": 0.0,
                              "augment.zoom": 0.0, "augment.translation": 0.0,
                              "augment.contrast": 0.0, "augment.brightness": 0.0})
    classes = read_classes()
    data = make_data(params, classes)
    keras.utils.set_random_seed(params.train.seed)
    clf = build_classifier(params.model, len(classes), None, seed=params.train.seed)
    checkpoints = root / f"checkpoints-{way}"
    checkpoints.mkdir(exist_ok=True)
    tracker = Tracker(clf, TrackerState(), params.train.monitor, 0, checkpoints,
                      hooks=[resume_saver(clf, checkpoints / "last", way, None)])
    start = time.perf_counter()
    extra = {}
    if params.features.cache:  # what the features stage does, then what train does
        extra["extraction_seconds"] = _attach_features(root, clf, params, data)
    run_head_phase(clf, data, params.train, tracker)
    elapsed = time.perf_counter() - start
    return {"seconds": round(elapsed, 2), "seconds_per_epoch": round(elapsed / args.epochs, 3),
            "val_accuracy": round(max(r["val_accuracy"] for r in tracker.state.history), 4),
            "checkpoint_kb": round(sum(f.stat().st_size for f in checkpoints.rglob("*")
                                       if f.is_file()) / 1024, 1),
            "train_images": len(data.train_files), **extra}


def _attach_features(root: Path, clf, params, data) -> float:
    """The features stage's arrays for `clf`'s base, written under `root` and attached to
    `data` as train reads them; returns the stage's seconds."""
    from imgclf import features

    meta = features.write(root / "features", clf, params, data.train_files, data.val_files)
    data.features = features.read(root / "features", params, data, clf)
    return meta["seconds"]


# ------------------------------------------------------------------ pipeline vs step


def bench_pipeline_headroom(work: Path, args) -> dict:
    import keras

    from imgclf.data.manifests import read_classes
    from imgclf.model.network import build_classifier, unfreeze_top
    from imgclf.training.phases import compile_model, make_optimizer
    from imgclf.training.session import make_data

    root = _digits_project(work / "pipeline", args.per_class)
    os.chdir(root)
    params = _params(root, **{"model.image_size": args.step_size, "model.weights": None})
    classes = read_classes()
    data = make_data(params, classes)
    batches = args.batches
    ds = data.make_images(data.train_files, data.train_labels, True, params.train.seed)
    it = iter(ds.repeat())
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    pipeline_ips = batches * params.train.batch_size / (time.perf_counter() - start)

    clf = build_classifier(params.model, len(classes), None)
    unfreeze_top(clf.base, params.train.unfreeze)
    compile_model(clf.model, make_optimizer(params.train, 1e-5), params.train)
    x, y = next(iter(ds))
    clf.model.train_on_batch(x, y)  # trace once
    start = time.perf_counter()
    for _ in range(args.step_batches):
        clf.model.train_on_batch(x, y)
    step_ips = args.step_batches * len(x) / (time.perf_counter() - start)
    os.chdir(ROOT)
    keras.backend.clear_session()
    return {"input_pipeline_headroom": round(pipeline_ips / step_ips, 2),
            "input_pipeline": {"pipeline_images_per_s": round(pipeline_ips, 1),
                               "train_step_images_per_s": round(step_ips, 1),
                               "image_size": args.step_size,
                               "batch_size": params.train.batch_size}}


# ------------------------------------------------------------------ forward vs peak


def conv_flops(model) -> float:
    """Multiply-add FLOPs (x2) of one image through the model's conv and dense layers."""
    import keras

    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += conv_flops(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.kernel.shape[2]
            _, h, w, cout = layer.output.shape
            total += 2.0 * h * w * kh * kw * cin * cout
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def bench_forward_peak(work: Path, args) -> dict:
    import keras
    import tensorflow as tf

    n = 2048
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    matmul(a, b).numpy()
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        out = matmul(a, b)
    out.numpy()
    peak = reps * 2 * n**3 / (time.perf_counter() - start) / 1e9

    base = keras.applications.InceptionResNetV2(include_top=False, weights=None,
                                                input_shape=(299, 299, 3))
    flops = conv_flops(base)
    forward = tf.function(lambda x: base(x, training=False))
    x = tf.random.uniform((args.forward_batch, 299, 299, 3), -1, 1)
    forward(x).numpy()
    start = time.perf_counter()
    forward(x).numpy()
    elapsed = time.perf_counter() - start
    achieved = args.forward_batch * flops / elapsed / 1e9
    keras.backend.clear_session()
    return {"forward_peak_fraction_299": round(achieved / peak, 3),
            "forward_299": {"gflop_per_image": round(flops / 1e9, 2),
                            "images_per_s": round(args.forward_batch / elapsed, 2),
                            "achieved_gflop_per_s": round(achieved, 1),
                            "matmul_peak_gflop_per_s": round(peak, 1)}}


# ------------------------------------------------------------------ bf16


def bench_bf16(work: Path, args) -> dict:
    import keras
    import tensorflow as tf

    from imgclf.model.network import build_classifier, unfreeze_top
    from imgclf.params import ModelParams, TrainParams
    from imgclf.training.phases import compile_model, make_optimizer

    results = {}
    x = tf.random.uniform((32, args.step_size, args.step_size, 3), 0, 255)
    y = tf.one_hot(tf.random.uniform((32,), 0, 10, tf.int32), 10)
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        clf = build_classifier(ModelParams(image_size=args.step_size, weights=None), 10, None)
        unfreeze_top(clf.base, TrainParams().unfreeze)
        compile_model(clf.model, make_optimizer(TrainParams(), 1e-5), TrainParams())
        clf.model.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(args.step_batches):
            clf.model.train_on_batch(x, y)
        results[policy] = round(args.step_batches * 32 / (time.perf_counter() - start), 2)
        keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    accuracy = _bf16_accuracy(work, args)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"bf16_speedup": round(results["mixed_bfloat16"] / results["float32"], 2),
            "bf16": {"train_step_images_per_s": results, "image_size": args.step_size,
                     "val_accuracy": accuracy, "accuracy_epochs": args.epochs,
                     "cpu_has_avx512_bf16": "avx512_bf16" in flags}}


def _bf16_accuracy(work: Path, args) -> dict:
    """Validation accuracy on the demo digits, phase 1 on cached features (what the demo
    trains), the base run once per image and the head trained, under each policy."""
    import keras

    from imgclf.data.manifests import read_classes
    from imgclf.model.network import build_classifier
    from imgclf.training.phases import Tracker, TrackerState, run_head_phase
    from imgclf.training.session import make_data

    root = _digits_project(work / "bf16", args.per_class)
    os.chdir(root)
    params = _params(root, **{"model.image_size": args.size, "model.weights": None,
                              "train.head_lr": 0.01, "augment.flip": "none",
                              "train.head_epochs": args.epochs,
                              "train.early_stopping_patience": 0})
    classes = read_classes()
    data = make_data(params, classes)
    accuracy = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(params.train.seed)
        clf = build_classifier(params.model, len(classes), None, seed=params.train.seed)
        tracker = Tracker(clf, TrackerState(), "val_accuracy", 0, root, [])
        _attach_features(root, clf, params, data)
        run_head_phase(clf, data, params.train, tracker)
        accuracy[policy] = round(max(r["val_accuracy"] for r in tracker.state.history), 4)
        keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    os.chdir(ROOT)
    return accuracy


# ------------------------------------------------------------------ XLA


def bench_xla(work: Path, args) -> dict:
    """The phase-2 training step and the forward pass with XLA (`jit_compile=True`) vs
    without, same model and batch: the lever is kept only if this ratio says so."""
    import keras
    import tensorflow as tf

    from imgclf.model.network import build_classifier, unfreeze_top
    from imgclf.params import ModelParams, TrainParams
    from imgclf.training.phases import compile_model, make_optimizer

    x = tf.random.uniform((32, args.step_size, args.step_size, 3), 0, 255)
    y = tf.one_hot(tf.random.uniform((32,), 0, 10, tf.int32), 10)
    step, forward, compile_s = {}, {}, {}
    for jit in (False, True):
        clf = build_classifier(ModelParams(image_size=args.step_size, weights=None), 10, None)
        unfreeze_top(clf.base, TrainParams().unfreeze)
        compile_model(clf.model, make_optimizer(TrainParams(), 1e-5), TrainParams())
        clf.model.jit_compile = jit
        start = time.perf_counter()
        clf.model.train_on_batch(x, y)
        compile_s[str(jit)] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        for _ in range(args.step_batches):
            clf.model.train_on_batch(x, y)
        step[str(jit)] = args.step_batches * 32 / (time.perf_counter() - start)
        call = tf.function(lambda a, m=clf.model: m(a, training=False), jit_compile=jit)
        call(x)
        start = time.perf_counter()
        for _ in range(args.step_batches):
            call(x)
        forward[str(jit)] = args.step_batches * 32 / (time.perf_counter() - start)
        keras.backend.clear_session()
    return {"xla_speedup": round(step["True"] / step["False"], 2),
            "xla": {"train_step_speedup": round(step["True"] / step["False"], 2),
                    "forward_speedup": round(forward["True"] / forward["False"], 2),
                    "first_step_seconds": {"xla": compile_s["True"], "plain": compile_s["False"]},
                    "image_size": args.step_size}}


# ------------------------------------------------------------------ pipeline runs


def _project_copy(repo: Path) -> Path:
    """`repo` made a copy of the project: pipeline, params and code."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("stages", "imgclf"):
        shutil.copytree(ROOT / package, repo / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def _tiny_repo(work: Path, per_class: int) -> Path:
    repo = _project_copy(work / "repo")
    from imgclf.data.demo import write_digits

    write_digits(repo / "data/raw", limit_per_class=per_class)
    return _versioned(repo)


GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.com"}


def _versioned(repo: Path) -> Path:
    """`repo` as a git + DVC repository with everything in it committed."""
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "init"]):
        _run(cmd, repo, GIT_ENV)
    return repo


def bench_repro_and_export(work: Path, args) -> dict:
    """Train a small model on the digits through dvc repro; then the no-op repro, which
    stages an evaluate-only change reruns, and the export formats' speed vs Keras."""
    repo = _tiny_repo(work / "repro", args.per_class)
    sets = ["-S", f"model.image_size={args.size}", "-S", "model.weights=null",
            "-S", "augment.flip=none", "-S", "train.head_lr=0.01",
            "-S", f"train.head_epochs={args.epochs}", "-S", "train.finetune_epochs=1",
            "-S", "export.measure=true"]
    _run(["dvc", "exp", "run", *sets], repo)
    start = time.perf_counter()
    noop = _run(["dvc", "repro"], repo)
    noop_seconds = time.perf_counter() - start
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load((repo / "params.yaml").read_text())
    params["evaluate"]["tta"] = True
    with (repo / "params.yaml").open("w") as handle:
        yaml.dump(params, handle)
    dry = _run(["dvc", "repro", "--dry"], repo)
    rerun = [line.split("'")[1] for line in dry.stdout.splitlines()
             if line.startswith("Running stage")]
    export = json.loads((repo / "reports/export.json").read_text())
    formats = export["formats"]
    return {
        "noop_repro_seconds": round(noop_seconds, 2),
        "noop_repro_ran_stages": [line.split("'")[1] for line in noop.stdout.splitlines()
                                  if line.startswith("Running stage")],
        "stages_rerun_on_evaluate_param": rerun,
        "export_speedup": export["speedup_vs_keras_predict"],
        "export": {"recommended": export["recommended"], "image_size": args.size,
                   "formats": {n: {k: f[k] for k in ("images_per_s", "latency_ms_batch1",
                                                     "top1_agreement", "size_mb")}
                               for n, f in formats.items()}},
    }


# ------------------------------------------------------------------ the pipeline's cost

STAGE_ORDER = ("prepare", "augment_preview", "features", "train", "selective", "package",
               "register", "evaluate", "export")


def _photo_repo(work: Path, images: int, classes: int = 8) -> Path:
    """A git + DVC repository of the project holding `images` generated 400x300 photos."""
    repo = _project_copy(work / f"photos-{images}")
    for i, img in enumerate(_photo_like(images, seed=3)):
        path = repo / "data/raw" / f"class_{i % classes}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    return _versioned(repo)


# Linux carries the peak memory of the process a command is forked from across its exec: a
# command forked from this process (TensorFlow loaded by the benches before) would report at
# least this process's peak. A small launcher forks it instead, and writes its peak (KB) and
# the wall-clock time it started (what `_pipeline_run` orders the stages by). A stage that
# ran in a child of the warm server (imgclf/warm.py) is not the command's descendant: the
# command writes that child's peak where IMGCLF_WARM_PEAK_FILE says.
_LAUNCHER = """import os, sys, time
started = time.time()
served = sys.argv[1] + ".served"
os.environ["IMGCLF_WARM_PEAK_FILE"] = served
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
peak = usage.ru_maxrss
if os.path.exists(served):
    peak = max(peak, int(open(served).read()))
    os.remove(served)
with open(sys.argv[1], "w") as out:
    out.write(f"{peak} {started}")
sys.exit(os.waitstatus_to_exitcode(status))
"""

# The stages' `python` (dvc.yaml's commands find it on PATH) in `_pipeline_run`: each stage
# through the launcher, its marks in a file named after its module.
_STAGE_PYTHON = """#!/bin/sh
case "$1 $2" in
  "-m stages."*) exec "{python}" "{launcher}" "{marks}/$2" "{python}" "$@" ;;
  *) exec "{python}" "$@" ;;
esac
"""


def _timed(cmd: list[str], cwd: Path, log: Path | None = None,
           bin_first: Path | None = None) -> tuple[float, float]:
    """(seconds, peak resident MB of the command and everything it waited for); its
    standard output to `log`, if given; `bin_first`: a folder searched first on PATH."""
    path = [str(p) for p in (bin_first, Path(sys.executable).parent) if p]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": ":".join([*path, os.environ.get("PATH", "")]), **GIT_ENV}
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak, \
            open(log or os.devnull, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, peak.name, *cmd], cwd=cwd,
                              env=env, stdout=out, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:].decode()}")
        return seconds, int(peak.read().split()[0]) / 1024


def _pipeline_run(repo: Path, work: Path, stages: tuple[str, ...] = STAGE_ORDER
                  ) -> dict[str, dict]:
    """One `dvc repro` of the whole pipeline, as users run it: {stage: {seconds,
    peak_rss_mb}}. A stage's seconds run from its process's start to the next stage's (DVC
    hashing and caching its outputs and checking the next one included; the first from
    DVC's own start, the last to DVC's end), so they add up to the whole run; its peak is
    that of its process and what it waited for."""
    marks, bin_dir = work / "stage-marks", work / "stage-bin"
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir(parents=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "launcher.py"
    launcher.write_text(_LAUNCHER)
    shim = bin_dir / "python"
    shim.write_text(_STAGE_PYTHON.format(python=sys.executable, launcher=launcher,
                                         marks=marks))
    shim.chmod(0o755)
    started = time.time()
    _timed(["dvc", "repro"], repo, bin_first=bin_dir)
    ended = time.time()
    peaks, starts = {}, {}
    for stage in stages:  # every stage ran: a missing mark is an error
        peak, starts[stage] = map(float, (marks / f"stages.{stage}").read_text().split())
        peaks[stage] = peak / 1024
    order = sorted(stages, key=starts.get)  # the order DVC chose
    bounds = [started] + [starts[s] for s in order[1:]] + [ended]
    ran = {stage: {"seconds": bounds[i + 1] - bounds[i], "peak_rss_mb": peaks[stage]}
           for i, stage in enumerate(order)}
    return {stage: ran[stage] for stage in stages}


def _forward_seconds(repos: dict[int, Path], size: int, repeats: int = 3) -> dict[int, float]:
    """One Keras forward pass of the whole model over each repo's train + val + test images
    (decode included, as every stage pays it), {images: seconds}: all sizes in one fresh
    process, their passes interleaved, the fastest of `repeats` each. Every ratio divides by
    the difference between two of them: a stall in one pass measured alone can double it."""
    code = f"""
import json, os, time
from imgclf.data.manifests import read_classes, read_manifest
from imgclf.data.pipeline import image_dataset
from imgclf.model.network import build_classifier
from imgclf.params import load_params
repos = {json.dumps({n: str(r) for n, r in repos.items()})}
datasets = {{}}
for n, repo in repos.items():
    os.chdir(repo)
    classes = read_classes()
    files = sum((read_manifest(s, classes)[0] for s in ("train", "val", "test")), [])
    datasets[n] = image_dataset([os.path.join(repo, f) for f in files], None, 0, {size},
                                "crop", 32)
clf = build_classifier(load_params().model, len(classes), None)
clf.model.predict(next(iter(datasets.values())).take(1), verbose=0)  # traced once, not timed
best = {{}}
for _ in range({repeats}):
    for n, images in datasets.items():
        start = time.perf_counter()
        clf.model.predict(images, verbose=0)
        best[n] = min(best.get(n, float("inf")), time.perf_counter() - start)
print(json.dumps(best))
"""
    out = _run([sys.executable, "-c", code], next(iter(repos.values()))).stdout
    return {int(n): t for n, t in json.loads(out.strip().splitlines()[-1]).items()}


def _cache_mb(repo: Path) -> float:
    return _dir_mb(repo / ".dvc/cache")


def bench_pipeline_cost(work: Path, args) -> dict:
    """The whole pipeline as users run it (one `dvc repro`, each stage timed in it), at two
    dataset sizes: its cost per image in forward passes, its fixed cost, each stage's peak
    memory; then a training-params-only experiment (`dvc exp run -S train.finetune_lr=...`)
    on the larger one."""
    size = args.step_size
    sets = {"model.image_size": size, "model.weights": None,
            "train.early_stopping_patience": 0}
    # The whole pipeline `--pipeline-repeats` times at each size, each in a fresh repository
    # (a rerun in place would reuse stored features and registered versions): each stage's
    # fastest run counts. On a shared machine a stage sometimes stalls for tens of seconds,
    # and a slow phase can last minutes: each repeat runs every size in turn, so that such a
    # phase slows both sizes' runs alike instead of tilting the line between them (the fixed
    # part is its value at zero images: a slope off by a little moves it by a lot).
    best: dict[int, dict[str, dict]] = {images: {} for images in args.pipeline_images}
    repos: dict[int, Path] = {}
    for repeat in range(args.pipeline_repeats):
        # Only the last repeat's repositories are used after the timings (the experiment,
        # the forward passes): each earlier one goes once it is timed, so the bench needs
        # the disk of one repeat, not of all of them.
        if repeat:
            shutil.rmtree(work / f"cost-{repeat - 1}")
        for images in args.pipeline_images:
            folder = work / f"cost-{repeat}"
            repo = repos[images] = _photo_repo(folder, images)
            _write_params(repo, **sets)
            for stage, ran in _pipeline_run(repo, folder).items():
                kept = best[images].setdefault(stage, dict(ran))
                kept.update(seconds=min(kept["seconds"], ran["seconds"]),
                            peak_rss_mb=max(kept["peak_rss_mb"], ran["peak_rss_mb"]))
    runs = {}
    for images, stages in best.items():
        stages = {k: {"seconds": round(v["seconds"], 1), "peak_rss_mb": round(v["peak_rss_mb"])}
                  for k, v in stages.items()}
        runs[images] = {"repo": repos[images], "stages": stages,
                        "pipeline_seconds": sum(s["seconds"] for s in stages.values()),
                        "features_mb": _dir_mb(repos[images] / "data/features")}
    # The forward passes every ratio divides by, measured at three moments of the run (here,
    # after the experiment, at the end), the fastest of the three kept: a slow phase of a
    # shared machine can last minutes, long enough to take three passes in a row.
    forward = _forward_seconds(repos, size, repeats=1)
    small, large = sorted(runs)

    repo = runs[large]["repo"]
    _run(["git", "add", "-A"], repo, GIT_ENV)
    _run(["git", "commit", "-q", "-m", "baseline"], repo, GIT_ENV)
    before = _cache_mb(repo)
    log = work / "experiment.log"
    experiment, _ = _timed(["dvc", "exp", "run", "-S", "train.finetune_lr=0.00002"], repo, log)
    experiment_mb = _cache_mb(repo) - before
    forward = {n: min(t, forward[n]) for n, t in _forward_seconds(repos, size, 1).items()}
    ran = [line.split("'")[1] for line in log.read_text().splitlines()
           if line.startswith("Running stage")]
    # The formats' speeds (export.measure, off in the timed runs above as by default), and
    # the lever beyond the defaults: full-integer int8, calibrated on training images.
    _timed(["dvc", "exp", "run", "-S", "export.measure=true", "export"], repo)
    export = json.loads((repo / "reports/export.json").read_text())
    _timed(["dvc", "exp", "run", "-S", "export.measure=true", "-S",
            "export.tflite=[dynamic,int8]", "export"], repo)
    levers = json.loads((repo / "reports/export.json").read_text())["formats"]
    forward = {n: min(t, forward[n]) for n, t in _forward_seconds(repos, size, 1).items()}
    for images, seconds in forward.items():
        runs[images]["forward_seconds"] = seconds
    slope = ((runs[large]["pipeline_seconds"] - runs[small]["pipeline_seconds"])
             / (large - small))
    forward_slope = ((runs[large]["forward_seconds"] - runs[small]["forward_seconds"])
                     / (large - small))
    fixed = runs[small]["pipeline_seconds"] - slope * small
    # Every figure of this bench carries its image size: the targets name one
    # (fixed part at 150 px, marginal at 299 px), and runs at both sizes live side by side.
    return {
        f"pipeline_marginal_forward_passes_{size}": round(slope / forward_slope, 2),
        f"pipeline_fixed_seconds_{size}": round(fixed, 1),
        f"head_only_experiment_forward_passes_{size}": round(
            max(0.0, experiment - fixed) / runs[large]["forward_seconds"], 2),
        f"cache_mb_per_image_{size}": round(runs[large]["features_mb"] / large, 4),
        f"experiment_cache_mb_{size}": round(experiment_mb, 1),
        # The export stage's own table at this size (random init: its quantised agreement
        # counts only the images that are no close call).
        f"export_speedup_{size}": export["speedup_vs_keras_predict"],
        # int8 over Keras predict, beside its agreement over the images that are no close call
        # (on a random-init model, few are: the note gives it on a trained one)
        f"export_speedup_{size}_int8": round(levers["tflite_int8"]["images_per_s"]
                                             / levers["keras"]["images_per_s"], 2),
        f"export_{size}_int8": {k: levers["tflite_int8"].get(k) for k in (
            "images_per_s", "top1_agreement", "decided_top1_agreement", "decided_images")},
        f"export_{size}": {"recommended": export["recommended"], "formats": {
            n: {k: f.get(k) for k in ("images_per_s", "top1_agreement",
                                      "decided_top1_agreement", "decided_images")}
            for n, f in export["formats"].items()}},
        f"pipeline_{size}": {
            "image_size": size, "images": [small, large], "classes": 8,
            "runs_per_size": args.pipeline_repeats, "sizes_interleaved": True,
            "timed_with": "dvc repro",  # one run of the whole pipeline (_pipeline_run)
            # stages after the first in a child of the warm server, as users run them
            "warm_starts": os.environ.get("IMGCLF_WARM", "1") != "0",
            "photo": "400x300 JPEG", "epochs": "params.yaml defaults, no early stop",
            "seconds_by_stage": {n: {k: v["seconds"] for k, v in r["stages"].items()}
                                 for n, r in runs.items()},
            "peak_rss_mb_by_stage": {
                stage: [runs[n]["stages"][stage]["peak_rss_mb"] for n in (small, large)]
                for stage in STAGE_ORDER},
            "forward_pass_seconds": {n: round(r["forward_seconds"], 1)
                                     for n, r in runs.items()},
            "head_only_experiment_seconds": round(experiment, 1),
            # the key name; the experiment changes a training param only
            "head_only_experiment_command":
                "dvc exp run -S train.finetune_lr=0.00002",
            # what it ran: never `features`
            "head_only_experiment_stages_run": ran,
            "features_mb": {n: round(r["features_mb"], 1) for n, r in runs.items()}},
    }


def bench_finetune_ways(work: Path, args) -> dict:
    """Phase 2 on the stored activations at the cut vs on images (the whole base every
    step, fresh augmentation every epoch): validation accuracy and seconds, on the demo
    digits with the demo's settings and `--finetune-epochs` fine-tune epochs."""
    import pandas as pd

    root = _digits_project(work / "finetune", args.per_class)
    out = {}
    for way in ("stored", "images"):
        _write_params(root, **{"model.image_size": args.size, "model.weights": None,
                               "augment.flip": "none", "train.head_lr": 0.01,
                               "train.head_epochs": args.epochs,
                               "train.finetune_epochs": args.finetune_epochs,
                               "train.early_stopping_patience": 0,
                               "features.cache": way == "stored",
                               "mlflow.serving_format": "keras"})
        start = time.perf_counter()
        _run([sys.executable, "-m", "stages.features"], root)
        _run([sys.executable, "-m", "stages.train"], root)
        history = pd.read_csv(root / "reports/plots/train_history.csv")
        tuned = history[history["phase"] == "finetune"]
        out[way] = {"seconds": round(time.perf_counter() - start, 1),
                    "finetune_epoch_seconds": round(float(tuned["epoch_seconds"].mean()), 2),
                    "val_accuracy_after_head": round(float(
                        history[history["phase"] == "head"]["val_accuracy"].iloc[-1]), 4),
                    "val_accuracy_after_finetune": round(float(
                        tuned["val_accuracy"].iloc[-1]), 4)}
        shutil.rmtree(root / "models", ignore_errors=True)
    return {"finetune_stored_vs_images_val_accuracy": [
                out["stored"]["val_accuracy_after_finetune"],
                out["images"]["val_accuracy_after_finetune"]],
            "finetune_epoch_speedup_stored_vs_images": round(
                out["images"]["finetune_epoch_seconds"]
                / out["stored"]["finetune_epoch_seconds"], 1),
            "finetune_ways": {**out, "image_size": args.size,
                              "finetune_epochs": args.finetune_epochs}}


def bench_served_formats(work: Path, args) -> dict:
    """Every format the registered model may serve with, and export's others, at
    `--formats-size` px against Keras `predict`, side by side in one run (the export stage's
    own table, `export.measure`): images/s at export.bench_batch_size, decided top-1
    agreement with Keras on the test split, what OpenVINO computed in; and the format
    `mlflow.serving_format: auto` chose on this machine (package timed the copies). The
    model is the demo digits trained with the demo's head settings (`--formats-per-class`
    a class), not calibrated: the demo's calibrated probabilities are all near-ties (close
    calls), which the agreement does not count, so it would count nothing."""
    size = args.formats_size
    root = _digits_project(work / "formats", args.formats_per_class)
    _write_params(root, **{"model.image_size": size, "model.weights": None,
                           "augment.flip": "none", "train.head_lr": 0.01,
                           "train.head_epochs": 15, "train.finetune_epochs": 0,
                           "train.calibrate": False,
                           "export.measure": True, "export.tflite": ["dynamic", "int8"]})
    for stage in ("features", "train", "selective", "package", "register", "export"):
        _run([sys.executable, "-m", f"stages.{stage}"], root)
    export = json.loads((root / "reports/export.json").read_text())
    package = json.loads((root / "reports/package.json").read_text())
    register = json.loads((root / "reports/register.json").read_text())
    keras = export["formats"]["keras"]["images_per_s"]
    formats = {n: {"images_per_s": f["images_per_s"],
                   "speedup_vs_keras_predict": round(f["images_per_s"] / keras, 2),
                   "top1_agreement": f["top1_agreement"],
                   "decided_top1_agreement": f.get("decided_top1_agreement"),
                   "decided_images": f.get("decided_images"),
                   # package's copies were checked on its validation sample, export's own
                   # conversions on its test sample
                   "checked_on": f.get("checked_on"), "checked_images": f.get("checked_images"),
                   "precision": package["candidates"].get(n, {}).get("precision")}
               for n, f in export["formats"].items()}
    return {f"served_speedup_{size}": {n: f["speedup_vs_keras_predict"]
                                       for n, f in formats.items() if n != "keras"},
            f"served_format_auto_{size}": register["serving_format"],
            f"served_formats_{size}": {"formats": formats,
                                       "batch_size": export["batch_size"],
                                       "test_images": export["parity_images"],
                                       "auto": {"chose": register["serving_format"],
                                                "images_per_s": register["serving_speeds"]}}}


def _dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def _registered_repo(work: Path, name: str, args) -> Path:
    """A repository with a registered version: repro_export's when it ran in this bench,
    else a tiny one trained just far enough (one head epoch) and registered."""
    repo = work / "repro" / "repo"
    if not (repo / "reports/register.json").is_file():
        repo = _tiny_repo(work / name, args.per_class)
        _run(["dvc", "exp", "run", "-S", f"model.image_size={args.size}", "-S",
              "model.weights=null", "-S", "train.head_epochs=1", "-S",
              "train.finetune_epochs=0", "register"], repo)
    return repo


def bench_serving(work: Path, args) -> dict:
    """The registered version as it deploys: the size of the environment made from its own
    requirements (uv, outside the project) and of what the deployment downloads (the
    version's artifacts, as `mlflow models serve` fetches them), the cold start of `mlflow
    models serve` (process start to first answer) and its throughput at 32 images a
    request."""
    repo = _registered_repo(work, "serving", args)
    # A TFLite-served version's figures, what the keys name: `auto` may serve another copy
    # on this machine (OpenVINO's, with its own runtime in the environment).
    _run(["dvc", "exp", "run", "-S", "mlflow.serving_format=tflite_dynamic", "register"], repo)
    train = json.loads((repo / "reports/register.json").read_text())
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    model_uri = f"models:/{train['registered_model']}/{train['model_version']}"
    model_dir = work / "served-model"
    _run([sys.executable, "-c", "import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
          "mlflow.artifacts.download_artifacts(sys.argv[2], dst_path=sys.argv[3])",
          uri, model_uri, str(model_dir)], work)
    uv = str(Path(sys.executable).parent / "uv")
    venv = work / "served-venv"
    env = {"VIRTUAL_ENV": str(venv)}
    _run([uv, "venv", "-q", "--python", "3.11", str(venv)], work, env)
    _run([uv, "pip", "install", "-q", "-r", str(model_dir / "requirements.txt")], work, env)
    config = json.loads((model_dir / "artifacts/config.json").read_text())

    from imgclf.tracking.deployment import serve_figures

    files = [str(f) for f in sorted((repo / "data/raw").rglob("*.png"))[:32]]
    figures = serve_figures(model_uri, uri, files, repo)
    return {"served_environment_mb": _dir_mb(venv),
            "served_artifacts_mb": _dir_mb(model_dir),
            "serve_cold_start_seconds": figures["cold_start_seconds"],
            "serve_images_per_s_batch32": figures["images_per_s_batch32"],
            "serving": {"format": config["format"], "image_size": config["image_size"],
                        "requirements": (model_dir / "requirements.txt").read_text().split()}}


def bench_status_cost(work: Path, args) -> dict:
    """What the status per image costs the served model: its format's forward pass answering
    the probabilities alone against the same pass answering the pooled features too, with
    the selective scores and thresholds applied (the registered version's own pyfunc, on the
    test split's pixels, best of five)."""
    repo = _registered_repo(work, "status", args)
    import mlflow
    import pandas as pd

    from imgclf.data.images import load_pixels
    from imgclf.serving.runners import in_chunks, tflite_runner

    register = json.loads((repo / "reports/register.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"models:/{register['registered_model']}/"
                                      f"{register['model_version']}")
    inner = served.unwrap_python_model()
    test = pd.read_csv(repo / "data/prepared/test.csv")
    pixels = np.stack([load_pixels(str(repo / p), inner.image_size, inner.resize)
                       for p in test["path"]]).astype(np.float32)
    lite = tflite_runner(repo / "models/model_dynamic.tflite", "tflite_dynamic")

    def images_per_s(fn) -> float:
        fn()
        best = min(_seconds(fn) for _ in range(5))
        return round(len(pixels) / best, 2)

    alone = images_per_s(lambda: in_chunks(lite.run, pixels))
    with_status = images_per_s(lambda: inner.selective.status(*in_chunks(lite.both, pixels)))
    return {"served_status_cost_ratio": round(alone / with_status, 3),
            "status_cost": {"images": len(pixels), "image_size": inner.image_size,
                            "method": inner.selective.method,
                            "forward_probabilities_images_per_s": alone,
                            "forward_features_and_status_images_per_s": with_status}}


def bench_feature_reuse(work: Path, args) -> dict:
    """The features stage after the data grows by 5% (the demo digits, one in twenty held
    back, then added): the share of the grown dataset's image views that went through the
    base, and the stage's time against a full run on the same grown data (store removed)."""
    root = work / "reuse"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    _write_params(root, **{"model.image_size": args.size, "model.weights": None})
    from imgclf.data.demo import write_digits

    write_digits(root / "data/raw", size=96, limit_per_class=args.per_class)
    held = work / "held"
    for i, path in enumerate(sorted((root / "data/raw").rglob("*.png"))):
        if i % 20 == 0:
            target = held / path.relative_to(root / "data/raw")
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    _run([sys.executable, "-m", "stages.prepare"], root)
    _run([sys.executable, "-m", "stages.features"], root)
    for path in held.rglob("*.png"):
        path.rename(root / "data/raw" / path.relative_to(held))
    _run([sys.executable, "-m", "stages.prepare"], root)
    grown, _ = _timed([sys.executable, "-m", "stages.features"], root)
    meta = json.loads((root / "data/features/meta.json").read_text())
    shutil.rmtree(root / "data/features")
    full, _ = _timed([sys.executable, "-m", "stages.features"], root)
    return {"features_forward_passes_after_5pct_more_images": round(
                meta["computed_rows"] / meta["rows"], 3),
            "features_seconds_after_5pct_more_vs_full": round(grown / full, 3),
            "feature_reuse": {"image_size": args.size, "rows": meta["rows"],
                              "computed_rows": meta["computed_rows"],
                              "kept_rows": meta["kept_rows"],
                              "grown_seconds": round(grown, 1), "full_seconds": round(full, 1)}}


def bench_spark(work: Path, args) -> dict:
    """Batch scoring on Spark's local mode (`local[2]`, both cores) against `imgclf predict`
    on the same folder and registered version, each in a fresh process timed whole; and
    the JVM's start-up alone (a Spark session made and stopped)."""
    repo = _registered_repo(work, "spark", args)
    register = json.loads((repo / "reports/register.json").read_text())
    model = f"models:/{register['registered_model']}/{register['model_version']}"
    folder = repo / "data/raw"
    images = len(list(folder.rglob("*.png")))
    started = time.perf_counter()
    _run([sys.executable, "-c", "from imgclf.tracking.spark import session; "
          "session('local[2]').stop()"], repo)
    jvm = time.perf_counter() - started
    predict, _ = _timed(["imgclf", "predict", str(folder), "--model", model, "-o",
                         str(work / "predict.csv")], repo)
    spark, _ = _timed(["imgclf", "spark-predict", str(folder), "--model", model, "--master",
                       "local[2]", "-o", str(work / "spark.parquet")], repo)
    return {"spark_vs_predict_images_per_s": round(predict / spark, 3),
            "spark_session_start_seconds": round(jvm, 1),
            "spark": {"images": images, "image_size": args.size, "master": "local[2]",
                      "predict_images_per_s": round(images / predict, 1),
                      "spark_predict_images_per_s": round(images / spark, 1)}}


def bench_team_remote(work: Path, args) -> dict:
    """docs/team.md's second clone: the pipeline run through DVC in clone A, then in clone B
    (cloned from A's bare origin, pulling A's files from a local-folder DVC remote) `dvc
    pull` followed by the `dvc repro` that finds nothing to run."""
    a = _tiny_repo(work / "team", args.per_class)
    remote, origin, b = work / "team/remote", work / "team/origin.git", work / "team/b"
    _run(["git", "init", "-q", "--bare", str(origin)], work)
    # The README's step 2: the images versioned by DVC, so that B pulls them too.
    _run(["dvc", "add", "data/raw"], a)
    _run(["dvc", "remote", "add", "-d", "shared", str(remote)], a)
    _run(["git", "add", "-A"], a)
    _run(["git", "commit", "-qm", "data and remote"], a, GIT_ENV)
    sets = ["-S", f"model.image_size={args.size}", "-S", "model.weights=null",
            "-S", "augment.flip=none", "-S", "train.head_lr=0.01",
            "-S", f"train.head_epochs={args.epochs}", "-S", "train.finetune_epochs=1"]
    full, _ = _timed(["dvc", "exp", "run", *sets, "evaluate"], a)
    _run(["git", "add", "-A"], a)
    _run(["git", "commit", "-qm", "run"], a, GIT_ENV)
    _run(["dvc", "push"], a)
    _run(["git", "push", "-q", str(origin), "HEAD:main"], a)
    _run(["git", "clone", "-q", "-b", "main", str(origin), str(b)], work)
    # A ran up to evaluate (export never ran, so it has no hash to pull): B pulls that far.
    pull, _ = _timed(["dvc", "pull", "--with-deps", "evaluate"], b)
    repro, _ = _timed(["dvc", "repro", "evaluate"], b)
    return {"clone_pull_and_repro_vs_full_run": round((pull + repro) / full, 3),
            "team_remote": {"images": len(list((a / "data/raw").rglob("*.png"))),
                            "image_size": args.size, "full_run_seconds": round(full, 1),
                            "dvc_pull_seconds": round(pull, 1),
                            "noop_repro_seconds": round(repro, 1),
                            "remote_mb": _dir_mb(remote)}}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_prepare(work: Path, args) -> dict:
    """prepare on generated photo-sized JPEGs (distinct photo-like images): throughput and
    peak memory, with the near-duplicate gate (the default) and without it, side by side."""
    root = work / "prepare"
    raw = root / "data/raw"
    for i, img in enumerate(_photo_like(args.prepare_images, seed=1, size=(500, 375))):
        path = raw / f"class_{i % 10}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=85)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    seconds, peak = {}, 0.0
    for gate in ("off", "on", "off", "on"):  # alternated: neither side gets a warmer cache
        _write_params(root, **{"prepare.near_duplicate_distance": None if gate == "off" else 4})
        took, peak_mb = _timed([sys.executable, "-m", "stages.prepare"], root)
        seconds[gate] = min(seconds.get(gate, float("inf")), took)
        peak = max(peak, peak_mb)
    groups = json.loads((root / "reports/prepare.json").read_text())["near_duplicate_groups"]
    return {"prepare_images_per_s": round(args.prepare_images / seconds["on"], 1),
            "prepare_near_duplicate_gate_slowdown": round(seconds["on"] / seconds["off"], 3),
            "prepare_peak_rss_mb": round(peak, 1),
            "prepare": {"images": args.prepare_images, "size": "500x375 JPEG",
                        "seconds_gate_on": round(seconds["on"], 2),
                        "seconds_gate_off": round(seconds["off"], 2),
                        "near_duplicate_groups": len(groups), "workers": os.cpu_count()}}


def _photo_like(count: int, seed: int = 0, size=(400, 300)):
    """Distinct photo-like images, one at a time (5,000 held at once would be 2.8 GB, which
    every subprocess forked from here would count as its own peak memory): smooth random
    colour fields (a bicubic blow-up of a few random pixels) with sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (4 + i % 5, 5 + i % 4, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), int)
        noisy = smooth + rng.integers(-20, 20, smooth.shape)
        yield Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _copies(img) -> dict:
    """How scraped copies come about: resized and re-saved, or lightly cropped."""
    from io import BytesIO

    from PIL import Image

    def jpeg(copy, quality):
        buffer = BytesIO()
        copy.save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    w, h = img.size
    c = int(0.04 * min(w, h))
    return {"resized": [jpeg(img.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.BICUBIC), 80),
                        jpeg(img.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.BILINEAR),
                             70)],
            "cropped": [jpeg(img.crop((c, c, w - c, h - c)), 85)]}


def bench_near_duplicates(work: Path, args) -> dict:
    """The leakage gate's threshold: true copies found and distinct images wrongly grouped, by
    Hamming distance, on the demo digits and on generated photo-like images."""
    from imgclf.data.demo import digit_images
    from imgclf.data.leakage import perceptual_hash

    def as_int(images):
        return np.array([int(perceptual_hash(i), 16) for i in images], dtype=np.uint64)

    digits = digit_images(96)
    photos = list(_photo_like(1000))
    sets = {"digits": ([img for _, _, img in digits], [label for label, _, _ in digits]),
            "photos": (photos, [i % 8 for i in range(len(photos))])}
    out: dict = {"near_duplicate_distance_default": 4}
    table = {}
    for name, (images, labels) in sets.items():
        hashes = as_int(images)
        originals = range(0, len(images), max(1, len(images) // 150))
        found: dict[str, list[int]] = {"resized": [], "cropped": []}
        for k in originals:
            for kind, copies in _copies(images[k]).items():
                found[kind] += [int(np.bitwise_count(h ^ hashes[k])) for h in as_int(copies)]
        upper = np.triu_indices(len(hashes), 1)
        distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[upper]
        labels = np.array(labels)
        across = labels[upper[0]] != labels[upper[1]]
        rows = {}
        for t in (0, 2, 4, 6, 8, 10):
            close = distance <= t
            rows[t] = {"resized_copies_found": round(float(np.mean(np.array(found["resized"])
                                                                   <= t)), 3),
                       "cropped_copies_found": round(float(np.mean(np.array(found["cropped"])
                                                                   <= t)), 3),
                       "distinct_pairs_grouped": int(close.sum()),
                       "distinct_pairs_grouped_across_labels": int((close & across).sum())}
        table[name] = rows
        default = rows[out["near_duplicate_distance_default"]]
        out[f"near_duplicate_copies_found_{name}"] = default["resized_copies_found"]
        out[f"near_duplicate_distinct_pairs_grouped_{name}"] = default["distinct_pairs_grouped"]
    out["near_duplicates"] = {"images": {k: len(v[0]) for k, v in sets.items()},
                              "by_max_distance": table}
    return out


BENCHES = {
    "near_duplicates": bench_near_duplicates,
    "prepare": bench_prepare,
    "forward": bench_forward_peak,
    "pipeline": bench_pipeline_headroom,
    "bf16": bench_bf16,
    "xla": bench_xla,
    "frozen": bench_frozen_phase,
    "repro_export": bench_repro_and_export,
    "serving": bench_serving,
    "status_cost": bench_status_cost,
    "feature_reuse": bench_feature_reuse,
    "spark": bench_spark,
    "team_remote": bench_team_remote,
    "pipeline_cost": bench_pipeline_cost,
    "finetune_ways": bench_finetune_ways,
    "served_formats": bench_served_formats,
}


# The instruction sets that decide which format and precision are fastest, as /proc/cpuinfo
# names them.
INSTRUCTION_SETS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def machine() -> dict:
    """What the figures were measured on, and when: docs/performance.md prints it once."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu_model": model, "cpus": os.cpu_count(),
            "instruction_sets": [f for f in INSTRUCTION_SETS if f in flags],
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "commit": commit}


def run_name(name: str, args) -> str:
    """The bench as measured_by names it: the pipeline's cost once per image size (its keys
    carry the size, and each size is a run of its own)."""
    return f"{name} {args.step_size} px" if name == "pipeline_cost" else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    parser.add_argument("--size", type=int, default=75, help="image size of the training runs")
    parser.add_argument("--step-size", type=int, default=150,
                        help="image size of the train-step and pipeline measurements")
    parser.add_argument("--epochs", type=int, default=10, help="phase-1 epochs compared")
    parser.add_argument("--per-class", type=int, default=None,
                        help="digits per class (default: all 1,797 images)")
    parser.add_argument("--batches", type=int, default=20, help="pipeline batches timed")
    parser.add_argument("--step-batches", type=int, default=3, help="train steps timed")
    parser.add_argument("--forward-batch", type=int, default=16)
    parser.add_argument("--prepare-images", type=int, default=5000)
    parser.add_argument("--pipeline-images", type=int, nargs=2, default=[320, 960],
                        help="the two dataset sizes of the pipeline's cost")
    parser.add_argument("--pipeline-repeats", type=int, default=2,
                        help="pipeline runs at each dataset size; each stage's fastest counts")
    parser.add_argument("--finetune-epochs", type=int, default=5,
                        help="fine-tune epochs of the stored-vs-images comparison")
    parser.add_argument("--formats-size", type=int, default=299,
                        help="image size of the served formats' comparison")
    parser.add_argument("--formats-per-class", type=int, default=30,
                        help="digits per class of the served formats' comparison")
    parser.add_argument("--output", default=str(ROOT / "reports/bench.json"))
    parser.add_argument("--frozen-way", choices=("plain", "cached"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frozen_way:  # one side of the frozen-phase comparison, in its own process
        print(json.dumps(frozen_way(args.frozen_way, args)))
        return
    output = Path(args.output)
    # --only refreshes some measurements and keeps the others from the last run.
    results: dict = json.loads(output.read_text()) if args.only and output.is_file() else {}
    # Which run measured each bench: with --only, the others keep their own machine and date
    # (a file from before this record: all of them the last run's, EARLIER).
    runs = results.setdefault("measured_by", {EARLIER: {
        k: results["machine"][k] for k in ("cpu_model", "instruction_sets", "date", "commit")}}
        if "machine" in results else {})
    results["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or BENCHES:
            start = time.perf_counter()
            print(f"bench {name} ...", flush=True)
            results.update(BENCHES[name](Path(tmp), args))
            runs[run_name(name, args)] = {k: results["machine"][k] for k in (
                "cpu_model", "instruction_sets", "date", "commit")}
            print(f"bench {name}: {time.perf_counter() - start:.0f} s", flush=True)
            io.write_json(output, results)  # what is measured survives a later failure
    print(f"\n{'measure':<34}{'value':>12}")
    for key, value in results.items():
        if not isinstance(value, dict | list):
            print(f"{key:<34}{value:>12}")
    print(f"\nfull results: {args.output}")


if __name__ == "__main__":
    main()
