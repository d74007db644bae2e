"""The layering the tree promises, checked: who may import whom, no cycles, small modules.

``schemas/`` is the ground floor (the values that flow, the error tree, plugin lookup):
it imports nothing of the project above it. ``stages/`` and ``backends/`` stand on it
and never import the engine, so a stage or a backend can be written without learning
``pipeline/``. No module imports another that imports it back, directly or around a
longer loop, whether at the top or inside a function. A module over `MAX_LINES` lines
says why at its top (a line starting "Long because").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "stages", "backends", "pipeline")
ALLOWED = {
    "schemas": {"schemas"},
    "stages": {"schemas", "stages"},
    "backends": {"schemas", "backends"},
    "pipeline": set(PACKAGES),
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            known = target
            while known and known not in MODULES:
                known = known.rpartition(".")[0]
            if known and known != name:
                found.add(known)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_modules_are_found() -> None:
    assert {"schemas.errors", "pipeline.engine.loop", "stages.base", "backends.base"} <= set(
        MODULES
    )
    assert "schemas.errors" in GRAPH["stages.base"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_a_floor_above_it(package: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package]
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(cycles)


def test_long_modules_say_why() -> None:
    unexplained = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and not any(
            line.startswith("Long because") for line in doc.splitlines()
        ):
            unexplained.append(f"{name}: {lines} lines")
    assert not unexplained, "\n".join(unexplained)
