"""The code's rooms stay readable: no module of the package over ~350 lines, and no import cycle between its
modules (imports at module level; imports inside functions are how a module defers a heavy dependency)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("merging", "tasks", "flows", "infra")
MAX_LINES = 360


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Returns the package modules `path` imports at module level (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    targets: set[str] = set()
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def test_no_module_is_over_the_limit():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules where a reader would look for the pieces: {long}"


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: _top_level_imports(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how a package is assembled, not a cycle of rooms.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[name].name == "__init__.py" and t.startswith(name + "."))}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], cycles


def test_the_cycle_check_sees_a_cycle(tmp_path: Path, monkeypatch):
    (tmp_path / "merging").mkdir()
    (tmp_path / "merging" / "__init__.py").write_text("")
    (tmp_path / "merging" / "a.py").write_text("from merging.b import g\n")
    (tmp_path / "merging" / "b.py").write_text("import merging.a\n")
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    try:
        test_no_import_cycle_between_modules()
    except AssertionError as exc:
        assert "merging.a" in str(exc) and "merging.b" in str(exc)
    else:
        raise AssertionError("a cycle a → b → a went unnoticed")
