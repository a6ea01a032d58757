"""The project as a user meets it: params errors, the CLI, and the DVC pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_class_folders, run_module, sh
from ruamel.yaml import YAML

from imgclf import paths
from imgclf.params import Params, load_params


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("split:\n  val: 1.5\n", "split.val = 1.5 is not allowed: input should be less than 1"),
        ("split:\n  val: 0.6\n  test: 0.5\n", "split.val + split.test = 0.6 + 0.5"),
        ("model:\n  image_size: 64\n", "model.image_size = 64 is not allowed"),
        ("train:\n  head_epochs: -2\n", "train.head_epochs = -2 is not allowed"),
        ("train:\n  batch_size: '32'\n", "train.batch_size = '32' is not allowed"),
        ("train:\n  learning_rate: 0.1\n", "unknown key train.learning_rate"),
        ("model:\n  resize: fit\n", "'stretch', 'crop' or 'pad'"),
        ("split: [1, 2\n", "params.yaml is not valid YAML"),
    ],
)
def test_bad_params_exit_2_with_one_line_naming_the_key(tmp_path, yaml_text, expected):
    (tmp_path / "params.yaml").write_text(yaml_text)
    result = run_module("stages.prepare", tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_shipped_params_are_the_real_run_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params == Params()  # params.yaml and the code's defaults say the same thing
    assert params.model.image_size == 299 and params.model.weights == "imagenet"
    flat = params.flat()
    for key in ("data.raw_dir", "data.labels_csv", "split.seed", "split.val", "split.test",
                "model.image_size", "model.weights", "train.batch_size", "train.head_epochs",
                "train.finetune_epochs", "mlflow.experiment", "mlflow.model_name"):
        assert key in flat


def test_params_yaml_comments_every_key():
    text = (ROOT / "params.yaml").read_text().splitlines()
    for line in text:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and line.startswith("  "):
            assert "#" in line, f"uncommented key: {line}"


def test_imgclf_help():
    exe = Path(sys.executable).parent / "imgclf"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: imgclf" in result.stdout


def test_dvc_yaml_names_the_paths_the_code_writes():
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages["prepare"]["outs"]}
    assert outs == {str(paths.PREPARED_DIR), str(paths.PREPARE_REPORT)}
    assert stages["prepare"]["params"] == ["data", "prepare", "split"]
    # Persistent: the stage keeps the rows of the images it has already stored.
    assert stages["features"]["outs"] == [{str(paths.FEATURES_DIR): {"persist": True}}]
    assert str(paths.FEATURES_DIR) in stages["train"]["deps"]


@pytest.mark.slow
def test_dvc_repro_prepare_then_nothing_to_do(dvc_repo):
    make_class_folders(dvc_repo / "data/raw", {"cat": 6, "dog": 6})
    first = sh(["dvc", "repro", "prepare"], dvc_repo)
    assert "Running stage 'prepare'" in first.stdout
    assert (dvc_repo / "data/prepared/train.csv").is_file()
    second = sh(["dvc", "repro", "prepare"], dvc_repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in sh(["dvc", "status", "prepare"], dvc_repo).stdout
    # A prepare param change reruns it; the split moves with the seed.
    sh(["dvc", "exp", "run", "-S", "split.seed=7", "prepare"], dvc_repo)
    assert "Running stage" not in sh(["dvc", "repro", "prepare"], dvc_repo).stdout


def test_dvc_yaml_is_valid_and_every_stage_has_its_module():
    result = sh(["dvc", "stage", "list"], ROOT)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert names == ["prepare", "augment_preview", "features", "train", "selective", "package",
                     "register", "evaluate", "export"]
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"]


def _imgclf_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Every imgclf module `module` can import, at the top or inside a function, followed
    through the modules it reaches."""
    import ast

    seen = set() if seen is None else seen
    path = ROOT / Path(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if module in seen or not source.is_file():
        return seen
    seen.add(module)
    parts = module.split(".")
    for i in range(1, len(parts)):
        _imgclf_modules(".".join(parts[:i]), seen)
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "imgclf":
                _imgclf_modules(name, seen)
    return seen


def test_each_stage_depends_on_every_library_module_it_imports():
    # A module a stage imports but dvc.yaml does not cover is a silent missing dependency:
    # changing it would not rerun the stage.
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    # Where a stage runs, not what it computes (imgclf/warm.py): no stage's dependency, or
    # a change to it would rerun the whole pipeline.
    launch = {"stages", "imgclf.warm"}
    assert launch <= _imgclf_modules("stages")
    for name, stage in stages.items():
        deps = [d for d in stage["deps"] if d.startswith("imgclf")]
        modules = _imgclf_modules(f"stages.{name}") - {f"stages.{name}"} - launch
        assert modules, name
        for module in modules:
            rel = Path(*module.split("."))
            file = rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py")
            covered = [d for d in deps if file.as_posix() == d
                       or file.as_posix().startswith(d.rstrip("/") + "/")]
            assert covered, f"dvc.yaml: stage {name} imports {module} ({file}) but no dep covers it"


def test_stage_scripts_are_only_the_pipeline_stages_and_the_library_is_a_package():
    assert sorted(p.name for p in (ROOT / "stages").glob("*.py")) == [
        "__init__.py", "augment_preview.py", "evaluate.py", "export.py", "features.py",
        "package.py", "prepare.py", "register.py", "selective.py", "train.py"]
    for script in (ROOT / "stages").glob("*.py"):
        assert len(script.read_text().splitlines()) <= 60, f"{script.name} is not thin"


@pytest.mark.slow  # builds the network or starts several processes: not the fast tier
def test_tensorflow_start_up_lines_do_not_reach_the_user():
    code = "import imgclf, tensorflow, sys; print('ready', file=sys.stderr)"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert quiet.returncode == 0 and quiet.stderr.strip() == "ready", quiet.stderr
    # What it hides is real: asked for everything, TensorFlow's lines are there.
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "oneDNN" in loud.stderr or "absl::InitializeLog" in loud.stderr


def test_a_stage_that_returns_ends_after_its_threads_and_exit_handlers(tmp_path):
    # A stage's main() run as the program skips the interpreter's teardown, not what exit
    # owes: a thread still writing (MLflow's logging, a copy) finishes, atexit handlers run,
    # buffered output is flushed; a stage's error still exits 2.
    program = f"""
import atexit, sys, threading, time
from imgclf.errors import UserError, exits_cleanly

def late_write():
    time.sleep(0.3)
    open({str(tmp_path / 'thread')!r}, "w").write("done")

@exits_cleanly
def main():
    threading.Thread(target=late_write).start()
    atexit.register(lambda: print("exit handler ran"))
    print("buffered", end="")
    if sys.argv[1:] == ["bad"]:
        raise UserError("a bad value")

main()
print("never")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "bufferedexit handler ran\n"  # and nothing after main()
    assert (tmp_path / "thread").read_text() == "done"
    bad = subprocess.run([sys.executable, "-c", program, "bad"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: a bad value"
