"""The library's layers point one way: a core that knows nothing of MLflow, DVC, serving or
processes; adapters over it; the CLI (and the stage scripts) composing both."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "imgclf"

# Layer of each top-level part of the package, and the layers each may import.
LAYERS = {
    "base": {"__init__", "_quiet", "errors", "io", "paths", "stage_reports"},
    "core": {"data", "model", "training", "features", "metrics", "params", "plots", "cards"},
    "serving": {"serving"},
    "adapter": {"tracking", "export", "evaluation"},
    "entry": {"cli", "warm"},
}
MAY_IMPORT = {
    "base": {"base"},
    "core": {"base", "core"},
    # What the registered model carries into production: the decode rules and the status
    # scores, nothing of training (data/images and model/selective only, checked below).
    "serving": {"base", "core", "serving"},
    "adapter": {"base", "core", "serving"},
    "entry": {"base", "core", "serving", "adapter", "entry"},
}
SERVING_MAY_USE_OF_CORE = {"imgclf.data", "imgclf.data.images", "imgclf.model",
                           "imgclf.model.selective"}
# Third-party libraries that belong to one adapter each.
ONLY_IN = {"mlflow": {"tracking", "serving"}, "dvc": set(), "pyspark": {"tracking"}}


def _part(module: str) -> str:
    """imgclf.tracking.runs -> tracking; imgclf -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(part: str) -> str:
    return next(layer for layer, parts in LAYERS.items() if part in parts)


def _module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
            # `from imgclf import io`: the module imported is imgclf.io
            if node.module == "imgclf":
                found += [f"imgclf.{alias.name}" for alias in node.names
                          if any(alias.name in parts for parts in LAYERS.values())]
    return found


def wrong_way_imports(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        part = _part(module)
        layer = _layer(part)
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top in ONLY_IN and part not in ONLY_IN[top]:
                wrong.append(f"{module} imports {imported}")
            if top != "imgclf" or imported == "imgclf":
                continue
            other = _part(imported)
            if other == part:
                continue
            if _layer(other) not in MAY_IMPORT[layer]:
                wrong.append(f"{module} ({layer}) imports {imported} ({_layer(other)})")
            elif layer == "serving" and _layer(other) == "core" and \
                    imported not in SERVING_MAY_USE_OF_CORE:
                wrong.append(f"{module} (serving) imports {imported}: serving carries no "
                             "training code")
            elif layer == "adapter" and _layer(other) == "adapter":
                wrong.append(f"{module} imports {imported}: adapters do not use each other")
    return wrong


def test_imports_point_from_entry_points_to_adapters_to_the_core():
    assert wrong_way_imports() == []


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert parts == set().union(*LAYERS.values())


def test_a_wrong_way_import_is_caught(tmp_path):
    # A copy of the package with one import against the direction: the core reaching MLflow
    # through tracking.
    import shutil

    copy = tmp_path / "imgclf"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "training" / "session.py").open("a") as module:
        module.write("\nfrom imgclf.tracking import store  # noqa\n")
    assert wrong_way_imports(copy) == [
        "imgclf.training.session (core) imports imgclf.tracking (adapter)"]
