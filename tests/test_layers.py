"""The module graph of `tui` has no cycle and the journal knows every undo kind.

Imports are read from the source (ast), every statement counted: the ones inside functions
and under `if TYPE_CHECKING:` too, since a lazy import is still a dependency (the journal's
old lazy imports of the operations it undid closed a 9-file circle)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tui"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of `tui` an imported name lives in (a.b.c -> a.b when c is not a module)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the `tui` modules any of its import statements name."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] == "tui":
                    owner = _owner(name, mods)
                    if owner and owner != mod:
                        deps.add(owner)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_imports_inside_functions() -> None:
    # tui.core.bases imports tui.core.snapshots.common only inside functions
    assert "tui.core.snapshots.common" in import_graph()["tui.core.bases"]


def test_no_import_cycle_among_tui_modules() -> None:
    # (the last knot, panes and the main screen reaching the App, went with tui.core.session)
    found = cycles(import_graph())
    assert found == []


def _pushed_kinds() -> set[str]:
    """Every undo kind a journal can hold: the literal kinds of every `.push(label, kind, …)`
    and `.step(label, kind, …)` in `tui`."""
    return {kind for kinds in _pushed_by_module().values() for kind in kinds}


def _registered_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json\nfrom tui.core import ops\n"
         "print(json.dumps(sorted(ops.UNDO)))"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout  # fmt: skip
    return set(json.loads(out))


def test_every_undo_kind_a_journal_can_hold_has_a_handler() -> None:
    kinds = _pushed_kinds()
    assert {"undefine", "delete_file", "redefine_snapshot", "delete_snapshot"} <= kinds
    # what the two faces that read other processes' journals import
    for entry in ("import tui.cli.recover", "import tui.app", "import tui.core.undo_kinds"):
        missing = kinds - _registered_after(entry)
        assert not missing, f"after '{entry}' no undo handler for {sorted(missing)}"


def test_the_journal_alone_does_not_know_the_operations_kinds() -> None:
    # ops is a generic journal: the snapshot kinds come from the modules that push them
    assert "redefine_snapshot" not in _registered_after("import tui.core.ops")


def _pushed_by_module() -> dict[str, set[str]]:
    """The undo kinds each module of `tui` pushes itself (as _pushed_kinds)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("push", "step")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                out.setdefault(module.removesuffix(".__init__"), set()).add(node.args[1].value)
    return out


def test_a_module_that_pushes_an_undo_kind_registers_it_when_imported_alone() -> None:
    """A process that runs only one operation (a CLI command, a test) has the handler of
    every kind that operation journals: a kind pushed without it fails the push ('unknown
    undo action'), as migrate's redefine_snapshot and snapshot create's delete_snapshot did."""
    by_module = _pushed_by_module()
    assert "tui.core.snapshots.create" in by_module, sorted(by_module)
    for module, kinds in sorted(by_module.items()):
        missing = kinds - _registered_after(f"import {module}")
        assert not missing, f"'import {module}' leaves no handler for {sorted(missing)}"


def test_no_function_in_tui_is_longer_than_80_lines() -> None:
    """Long planners hide their checks: each one gets a helper (issue 23)."""
    long = []
    for path in sorted((ROOT / "tui").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
