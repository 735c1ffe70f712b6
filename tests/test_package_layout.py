"""The package's layout holds: imports run one way (no circle of any length, counting imports inside
functions), scoring files never pulls in the training assembly, no private name crosses a module, and no
module grows past what one reader holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_multiad"
MAX_LINES = 450
#: what scores files; none of it may import the training assembly
SCORING = ("monai_multiad.inferers", "monai_multiad.screening", "monai_multiad.scan_outputs", "monai_multiad.cohort",
           "monai_multiad.calibration", "monai_multiad.inference", "monai_multiad.export", "monai_multiad.report",
           "monai_multiad.report_html")
TRAINING = ("monai_multiad.workflow", "monai_multiad.engines.trainer")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of the package in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("monai_multiad")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("monai_multiad"):
            found.append((node.module, [a.name for a in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            deps.update(_resolve(t) for t in targets)
        graph[name] = deps - {name, ""}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_circle():
    graph = _graph()
    circles = sorted(name for name in graph if name in _reach(graph, name))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("module", SCORING)
def test_scoring_does_not_import_training(module):
    graph = _graph()
    pulled = {m for m in graph if m == module or m.startswith(module + ".")}
    reached = set().union(*(_reach(graph, m) for m in pulled))
    assert not reached & set(TRAINING), f"{module} reaches {sorted(reached & set(TRAINING))}"


def test_no_private_name_crosses_a_module():
    crossing = [f"{name}: {module}.{n}" for name, path in MODULES.items() for module, names in _imports(path)
                for n in names if n.startswith("_") and not n.startswith("__") and _resolve(module) != name]
    assert not crossing


def test_no_module_over_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_graph_sees_a_circle_where_there_is_one(monkeypatch):
    """The check itself: a made-up pair importing each other is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert [n for n in graph if n in _reach(graph, n)] == ["a", "b"]
