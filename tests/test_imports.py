"""No import cycle anywhere in ``threaddispatch``.

The graph is read from the source, not from ``sys.modules``: every ``import`` statement of
every module counts, at module level, inside functions (lazy imports) and under
``if TYPE_CHECKING:`` alike, because a cycle is a design circle whichever way Python happens
to resolve it at run time. ``from package import name`` is an edge to ``package.name`` when
that is a module, else to ``package`` itself. The implicit import of a module's parent
packages is not an edge (every module would then be in a cycle with ``threaddispatch``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import threaddispatch

PACKAGE = "threaddispatch"
ROOT = Path(threaddispatch.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".")
    if not is_package:
        anchor.pop()
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _imported(module: str, is_package: bool, source: str, known: Mapping[str, Path]) -> Iterator[str]:
    """The package modules ``module`` imports, by any import statement anywhere in its ``source``."""
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in known:  # import a.b.c names the module a.b.c
                    name = name.rpartition(".")[0]
                if name:
                    yield name
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield submodule
                elif base in known:
                    yield base


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (no self edges)."""
    known = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        imported = _imported(name, path.name == "__init__.py", path.read_text(encoding="utf-8"), known)
        graph[name] = {target for target in imported if target != name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle_in_the_package() -> None:
    """No two modules of ``threaddispatch`` import each other, directly or through others."""
    assert cycles(import_graph()) == []


def test_the_checker_sees_lazy_relative_and_type_checking_imports() -> None:
    """The checker finds a circle made of a lazy, a relative and a TYPE_CHECKING import (it can fail)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import jobs\ndef f():\n    import x.y.z\n"
    known = {name: ROOT for name in (f"{PACKAGE}.jobs", f"{PACKAGE}.cli", "x.y")}
    assert set(_imported(f"{PACKAGE}.cli", False, source, known)) == {f"{PACKAGE}.jobs", "x.y"}
