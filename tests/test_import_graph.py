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


# What a function may import (docs/layering.md): an optional or heavy package that one path of
# the module does not need, and a project module that imports one of them when it is imported.
LAZY_OK = {
    "torch": "optional (the torch extra): a JAX run does not import it",
    "jax": "heavy: a torch run, and a CLI's --help or bad-input error, do not import it",
    "jaxlib": "as jax", "flax": "as jax", "optax": "as jax", "orbax": "as jax",
    "tokamax": "optional (the cuda12/plan extras), and it imports Triton",
    "absl": "tokamax's option flags, set just before tokamax is imported",
    "transformers": "optional (the hf extra)", "safetensors": "optional (the hf extra)",
    "huggingface_hub": "optional (the hf extra)", "tokenizers": "optional (the hf extra)",
    "tiktoken": "only the GPT-2 tokenizer needs it; slow to import",
    "datasets": "optional (the data extra)", "pyarrow": "optional (the data extra)",
    "wandb": "optional (the wandb extra)", "matplotlib": "heavy, for plots only",
}
# Project modules a function imports for a reason of its own: (file, module) -> the reason.
LAZY_HERE = {
    ("train.py", "nanomoe.train_loop"): "imported once __main__ has installed the signal "
    "handlers, so a Ctrl-C during its imports is noted, not raised",
}


def imported_names(node, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement names (relative ones made absolute)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
    return [base]


@functools.cache
def heavy_at_import() -> frozenset[str]:
    """Project modules whose import (their top-level imports, transitively) runs a LAZY_OK one."""
    known = project_files()
    heavy = set()
    for module, path in known.items():
        for node in imports(ast.parse(path.read_text(), str(path)), top_level_only=True):
            if any(n.split(".")[0] in LAZY_OK
                   for n in imported_names(node, module, path.name == "__init__.py")):
                heavy.add(module)
    graph, grew = graph_of(edges(top_level_only=True)), True
    while grew:
        grew = False
        for module, deps in graph.items():
            if module not in heavy and deps & heavy:
                heavy.add(module)
                grew = True
    return frozenset(heavy)


def lazy_imports(tree: ast.Module):
    """The imports inside functions (a __main__ block is the module's command: not counted)."""
    stack = [(n, False) for n in tree.body if not _is_main_block(n)]
    while stack:
        node, inside = stack.pop()
        if inside and isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        inner = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def needless_lazy_imports(module: str, path: Path, source: str) -> list[str]:
    known, heavy = project_files(), heavy_at_import()
    out = []
    for node in lazy_imports(ast.parse(source, str(path))):
        is_package = path.name == "__init__.py"
        for name in imported_names(node, module, is_package):
            mods = targets(node, module, is_package, known)
            where = str(path.relative_to(ROOT))
            if ((where, name) not in LAZY_HERE and name.split(".")[0] not in LAZY_OK
                    and not any(m in heavy for m in mods)):
                out.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_functions_import_only_heavy_or_optional_packages():
    """An import inside a function only for what one path does not need (LAZY_OK, or a project
    module that imports one of them); everything else belongs at the top of the module."""
    found = [line for module, path in project_files().items()
             for line in needless_lazy_imports(module, path, path.read_text())]
    assert not found, "move these to the top of their module:\n" + "\n".join(found)


@pytest.mark.parametrize("body,needless", [
    ("import json", True), ("from .errors import ConfigError", True),
    ("import numpy as np", True), ("import torch", False), ("from jax import numpy", False),
    ("from transformers import GPT2Config", False), ("import nanomoe_torch", False),
    ("from conversion.hf import to_hf", False),  # conversion/__init__ imports jax
])
def test_the_check_finds_a_planted_lazy_import(body, needless):
    """The check can fail: an in-function import planted in nanomoe/atomic.py is reported
    unless it is heavy or optional; the same import in a __main__ block is the command's."""
    path = ROOT / "nanomoe" / "atomic.py"
    source = path.read_text()
    assert not needless_lazy_imports("nanomoe.atomic", path, source)
    planted = needless_lazy_imports("nanomoe.atomic", path, f"{source}\n\ndef f():\n    {body}\n")
    assert bool(planted) == needless, planted
    main = f"{source}\n\nif __name__ == '__main__':\n    {body}\n"
    assert not needless_lazy_imports("nanomoe.atomic", path, main)
