"""The remote code ``to-hf`` writes for models no stock ``transformers`` class implements.

One source of truth: the templates in ``conversion/hf_remote`` import RMSNorm, RoPE, the router
and the experts (MoeGPT), justnorm, ``eff`` and the half-split rotary map (nGPT) from this
project between ``# <nanomoe-copied>`` markers, and
:func:`generate_files` replaces that block by those objects' source text (with the top-level
definitions they use from the same module, and their modules' non-project imports). The
exported files import nothing from this project, and change whenever the reference does.

Loading remote code runs it, so this project's own loaders never trust a folder's code:
``compare`` loads one only after :func:`check_remote_code` finds its code byte-identical to
what :func:`generate_files` writes now, and then only from the verified copy that
``hf_folder.verified_copy`` makes (nothing else of the folder reachable).
"""

from __future__ import annotations

import ast
import importlib.util
import os
from dataclasses import dataclass

from nanomoe.errors import ConversionError

PROJECT = ("nanomoe", "nanomoe_torch", "nanomoe_jax", "conversion")
BEGIN, END = "# <nanomoe-copied>", "# </nanomoe-copied>"
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")


@dataclass(frozen=True)
class RemoteModel:
    """One exportable architecture: its template files and the names in config.json."""

    model_type: str        # config.json's model_type (not one of ours: those are our folders)
    config_file: str       # configuration_*.py, in hf_remote/ and in the export
    modeling_file: str     # modeling_*.py
    config_class: str
    model_class: str

    @property
    def auto_map(self) -> dict[str, str]:
        return {"AutoConfig": f"{self.config_file[:-3]}.{self.config_class}",
                "AutoModelForCausalLM": f"{self.modeling_file[:-3]}.{self.model_class}"}


# keyed by nanomoe's model type (config.model_type_of)
REMOTE_MODELS = {
    "moegpt": RemoteModel("nanomoe_moegpt", "configuration_moegpt.py", "modeling_moegpt.py",
                          "NanoMoeGPTConfig", "NanoMoeGPTForCausalLM"),
    "ngpt": RemoteModel("nanomoe_ngpt", "configuration_ngpt.py", "modeling_ngpt.py",
                        "NanoNGPTConfig", "NanoNGPTForCausalLM"),
}
BY_HF_TYPE = {m.model_type: m for m in REMOTE_MODELS.values()}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _is_project(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PROJECT


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    """Name -> the def/class/assignment statement that binds it at module level."""
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def _names_used(node: ast.AST, annotations: bool) -> set[str]:
    """Names read by ``node``; without ``annotations``, those read only in type hints are left
    out (the generated file has ``from __future__ import annotations``: hints stay strings)."""
    hints: set[int] = set()
    if not annotations:
        for n in ast.walk(node):
            args = n.args if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            found = [n.returns] if args else []
            if args:
                found += [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs
                          + [args.vararg, args.kwarg] if a is not None]
            if isinstance(n, ast.AnnAssign):
                found.append(n.annotation)
            hints.update(id(x) for h in found if h is not None for x in ast.walk(h))
    return {n.id for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in hints}


def _segment(source: str, node: ast.stmt) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(source.splitlines()[first - 1:node.end_lineno])


def copied_block(requests: list[tuple[str, list[str]]]) -> tuple[list[str], list[str]]:
    """(import lines, definitions) for ``from MODULE import NAMES`` of project modules."""
    imports: list[str] = []
    parts: list[str] = []
    for module, names in requests:
        path = importlib.util.find_spec(module).origin
        source = _read(path)
        tree = ast.parse(source)
        defs = _top_level(tree)
        imported = {}  # name -> module, for this module's own imports
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if getattr(node, "level", 0) or _is_project(mod) or mod == "__future__":
                    for a in node.names:
                        imported[a.asname or a.name] = "project"
                    continue
                line = ast.get_source_segment(source, node)
                if line not in imports:
                    imports.append(line)
        wanted, todo = set(), list(names)
        while todo:  # the requested definitions and those they use from the same module
            name = todo.pop()
            if name in wanted:
                continue
            if name not in defs:
                raise ConversionError(f"{module} defines no {name} for the remote code")
            wanted.add(name)
            used = _names_used(defs[name], annotations=False)
            bad = sorted(n for n in used if imported.get(n) == "project")
            if bad:
                raise ConversionError(f"{module}.{name} uses {', '.join(bad)} from this project; "
                                      "the remote code cannot carry it: copy it too")
            todo += [n for n in used if n in defs]
        body = [_segment(source, n) for n in tree.body
                if any(defs.get(w) is n for w in wanted)]
        parts.append(f"# ---- copied verbatim from nanomoe's {module.replace('.', '/')}.py ----"
                     "\n\n" + "\n\n\n".join(body))
    return imports, parts


def render(template: str) -> str:
    """The template with its ``# <nanomoe-copied>`` block replaced by the copied source."""
    head, sep, rest = template.partition(BEGIN + "\n")
    block, sep2, tail = rest.partition(END + "\n")
    if not sep:
        return template  # nothing to copy (the configuration files)
    if not sep2:
        raise ConversionError(f"a template has {BEGIN} without {END}")
    requests = []
    for node in ast.parse(block).body:
        if not isinstance(node, ast.ImportFrom) or not _is_project(node.module):
            raise ConversionError(f"only 'from <project module> import ...' lines belong "
                                  f"between the markers, not {ast.unparse(node)!r}")
        requests.append((node.module, [a.name for a in node.names]))
    imports, parts = copied_block(requests)
    have = set(head.splitlines())
    extra = [line for line in imports if line not in have]
    return (head + "\n".join(extra) + ("\n\n\n" if extra else "\n\n")
            + "\n\n\n".join(parts) + "\n\n\n# ---- the transformers model ----\n" + tail)


def generate_files(model_type: str) -> dict[str, str]:
    """File name -> text of the remote code for nanomoe's ``model_type``."""
    spec = REMOTE_MODELS[model_type]
    return {name: render(_read(os.path.join(TEMPLATES, name)))
            for name in (spec.config_file, spec.modeling_file)}


def remote_model_of(config_json: dict) -> RemoteModel | None:
    return BY_HF_TYPE.get(config_json.get("model_type")) if config_json else None


def check_remote_code(folder: str, config_json: dict) -> RemoteModel:
    """Refuse a folder whose remote code or auto_map is not exactly what to-hf writes now."""
    spec = remote_model_of(config_json)
    if spec is None or config_json.get("auto_map") != spec.auto_map:
        raise ConversionError(f"{folder}: its auto_map is not one that to-hf writes, so its "
                              "code is not loaded")
    for name, text in generate_files(next(k for k, v in REMOTE_MODELS.items() if v is spec)).items():
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path) or _bytes(path) != text.encode():
            raise ConversionError(f"{path} differs from the code this version of nanomoe "
                                  "writes, so it is not run: export the model again with to-hf "
                                  "(or load it yourself with trust_remote_code=True)")
    return spec
