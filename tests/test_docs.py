"""The front door and the manual say what is true now: the README's pipeline is dvc.yaml's,
its links lead somewhere, the performance page is its measurement, no comment carries a
figure nobody measures any more."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

import pytest
from conftest import ROOT
from ruamel.yaml import YAML

from benchmarks import render

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _table_first_column(text: str, header: str) -> list[str]:
    """The first column of the Markdown table whose header row starts with `| header |`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip().strip("`"))
    return rows


def test_readme_pipeline_table_names_exactly_the_stages_of_dvc_yaml():
    stages = list(YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"])
    assert _table_first_column(README.read_text(), "stage") == stages


def test_readme_is_a_short_front_door():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", [README, ROOT / "CHANGELOG.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}"


# What history sounds like: it belongs in CHANGELOG.md and commit messages, not the manual.
HISTORY = re.compile(r"\b(it was|was \d|were \d|the day before|the run before|in the other "
                     r"run|last stop|no longer|used to|previously|\d+ before\b)|"
                     r"\b20\d\d-\d\d-\d\d\b|"  # a date, or a commit hash (hex, digits and letters)
                     r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])(?:[0-9a-f]{7,12}|[0-9a-f]{40})\b")


@pytest.mark.parametrize("page", [README, *[p for p in DOCS if p.name != "performance.md"]],
                         ids=lambda p: p.name)
def test_user_docs_hold_no_history(page):
    found = [line for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert found == []


def test_performance_page_is_rendered_from_the_committed_measurement():
    results = json.loads((ROOT / "reports/bench.json").read_text())
    assert (ROOT / "docs/performance.md").read_text() == render.render(results), (
        "docs/performance.md is not reports/bench.json's: run `python -m benchmarks.render`")
    machine = results["machine"]
    assert machine["cpu_model"] and machine["instruction_sets"] and machine["date"]


def test_every_headline_measurement_is_explained_on_the_performance_page():
    results = json.loads((ROOT / "reports/bench.json").read_text())
    scalars = [k for k, v in results.items() if isinstance(v, int | float)]
    assert scalars and [k for k in scalars if render.describe(k) is None] == []


# A measured figure: a ratio (3.1x), a duration (7 s, 40 ms), a size (200 MB), a throughput.
FIGURE = re.compile(r"\d(\.\d+)?x\b|\b\d[\d,.]*\s?(ms|s|seconds|minutes)\b|"
                    r"\b\d[\d,.]*\s?(KB|MB|GB)\b|\d\s?images/s")


def _comments_and_docstrings(path):
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def test_no_comment_states_a_measured_figure_without_its_bench_key():
    found = []
    for folder in ("imgclf", "stages"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _comments_and_docstrings(path):
                if FIGURE.search(text) and "make bench" not in text:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {FIGURE.search(text)[0]}")
    assert found == []
