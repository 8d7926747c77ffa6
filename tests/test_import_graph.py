"""Imports point one way (docs/layering.md): every module of the project is parsed with ``ast``
and its imports, at the top and inside functions, form two graphs that must have no cycle:

* packages (every import, a function's too): the layers of docs/layering.md, lower first;
* modules (top-level imports: what runs when a module is imported).

A module's ``if __name__ == "__main__":`` block is the command it runs, not part of the module
that others import, so it counts for the package graph only.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanomoe", "nanomoe_jax", "nanomoe_torch", "conversion", "nanomoe_train", "benchmarks")
SCRIPTS = ("train.py",)
# The layers, lowest first (docs/layering.md): a module imports its own package or lower layers.
LAYERS = (("nanomoe",), ("nanomoe_jax", "nanomoe_torch"), ("conversion",), ("nanomoe_train",),
          ("benchmarks", "train"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {module_name(p): p for p in files + [ROOT / s for s in SCRIPTS]}


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def imports(tree: ast.Module, top_level_only: bool):
    """(import node) for each import; ``top_level_only`` skips functions and __main__ blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif top_level_only and (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda)) or _is_main_block(node)):
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def targets(node, module: str, is_package: bool, known) -> list[str]:
    """The project modules an import runs: the ones it names (``from pkg import mod`` names
    pkg.mod) and, from outside their package, the packages above them (their __init__)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # jax.numpy, or an attribute of a project module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
        parts = name.split(".")
        if parts[0] != module.split(".")[0]:
            out += [p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in known]
    return out


@functools.cache
def edges(top_level_only: bool) -> frozenset[tuple[str, str]]:
    known = project_files()
    found = set()
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in imports(tree, top_level_only):
            for target in targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    found.add((module, target))
    return frozenset(found)


def package(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def graph_of(pairs) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for a, b in pairs:
        if a != b:
            graph.setdefault(a, set()).add(b)
    return graph


def package_graph() -> dict[str, set[str]]:
    return graph_of((package(a), package(b)) for a, b in edges(top_level_only=False))


def test_packages_import_one_way():
    assert find_cycle(package_graph()) is None, " -> ".join(find_cycle(package_graph()))


def test_modules_import_one_way():
    cycle = find_cycle(graph_of(edges(top_level_only=True)))
    assert cycle is None, " -> ".join(cycle)


def test_every_import_points_to_a_lower_layer():
    layer = {p: i for i, group in enumerate(LAYERS) for p in group}
    upward = sorted(f"{a} -> {b}" for a, b in edges(top_level_only=False)
                    if package(a) != package(b) and layer[package(a)] <= layer[package(b)])
    assert not upward, "imports against the layers of docs/layering.md:\n" + "\n".join(upward)


def test_the_check_finds_a_planted_cycle(tmp_path, monkeypatch):
    """The checks can fail: a planted import of conversion from nanomoe_jax is a cycle."""
    graph = package_graph()
    assert find_cycle(graph) is None
    graph.setdefault("nanomoe_jax", set()).add("conversion")
    assert find_cycle(graph) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("source,expected", [
    ("from . import loader", {("nanomoe.prefetch", "nanomoe.loader")}),
    ("from .loader import DataLoader", {("nanomoe.prefetch", "nanomoe.loader")}),
    ("def f():\n    import conversion.checkpoints",
     {("nanomoe.prefetch", "conversion.checkpoints"), ("nanomoe.prefetch", "conversion")}),
])
def test_imports_are_resolved(source, expected):
    known = project_files()
    found = {("nanomoe.prefetch", t) for node in imports(ast.parse(source), False)
             for t in targets(node, "nanomoe.prefetch", False, known)}
    assert found == expected


def test_every_package_is_parsed():
    assert {m.split(".")[0] for m in project_files()} >= set(PACKAGES) | {"train"}
    assert os.path.exists(ROOT / "docs" / "layering.md")
