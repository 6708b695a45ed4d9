"""The package's import graph has no cycle, counting imports inside functions too.

A function-level import hides a cycle from Python (it runs late) but not from a reader: two modules
that need each other are one module in two files. Only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_nnsight

PACKAGE = Path(pytest_nnsight.__file__).parent


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: first line}, for every .py file under `root`."""
    files = {module_name(root, f): f for f in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    top = root.name
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for alias in node.names:  # `from . import settings` names a module; `from .sites import Site` does not
                    targets.append(f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in files else prefix)
            for target in targets:
                while target and target not in files and "." in target:
                    target = target.rpartition(".")[0]
                if target in files and target != name and target.split(".")[0] == top:
                    graph[name].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    lines = [
        " <-> ".join(c)
        + ": "
        + "; ".join(f"{a} imports {b} (line {graph[a][b]})" for a in c for b in c if b in graph[a])
        for c in found
    ]
    assert not found, "import cycles in pytest_nnsight:\n" + "\n".join(lines)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import x\ndef g():\n    from .. import a\n"
    )
    (pkg / "d.py").write_text("from .sub.c import g\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c": 2}
    assert "pkg.d" not in graph["pkg.sub.c"]  # TYPE_CHECKING only
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


#: the plugin layer: the only modules that see the pytest session's settings (config.stash); the rest is the core
PLUGIN_LAYER = {"pytest_nnsight.plugin", "pytest_nnsight.fixtures", "pytest_nnsight.settings"}


def global_settings_reads(root: Path, allowed: set[str] = frozenset()) -> list[str]:
    """'module:line' for every use of a session-wide settings global (`ACTIVE`) outside the `allowed` modules."""
    found = []
    for file in sorted(root.rglob("*.py")):
        name = module_name(root, file)
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            hit = (
                (isinstance(node, ast.Attribute) and node.attr == "ACTIVE")
                or (isinstance(node, ast.Name) and node.id == "ACTIVE")
                or (isinstance(node, ast.ImportFrom) and any(a.name == "ACTIVE" for a in node.names))
            )
            if hit:
                found.append(f"{name}:{node.lineno}")
    return found


def test_the_core_reads_no_global_settings():
    """Settings reach the core through the served model (settings.settings_of) or as arguments, never a module global:
    a verb given a served model behaves the same in and out of a pytest session."""
    found = global_settings_reads(PACKAGE, PLUGIN_LAYER)
    assert not found, f"core modules read the global settings.ACTIVE (use settings.settings_of(model)): {found}"


def test_a_global_settings_read_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text("from . import settings\nsettings.ACTIVE = 1\n")
    (pkg / "sweeps.py").write_text("def f():\n    from . import settings as s\n    return s.ACTIVE\n")
    (pkg / "remote.py").write_text("from .settings import ACTIVE\n")
    assert global_settings_reads(pkg, {"pkg.plugin"}) == ["pkg.remote:1", "pkg.sweeps:3"]
