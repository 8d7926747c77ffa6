"""Hugging Face folders opened without letting anything in them run code.

``transformers`` takes code from many places in a folder: ``auto_map`` in config.json (and in
tokenizer, processor and feature-extractor configs; ``repo--module.Class`` there fetches code
from the hub), ``custom_generate/generate.py`` (run by ``from_pretrained`` under
``trust_remote_code``), ``adapter_config.json`` (a base model loaded from elsewhere), hub
kernels named by ``attn_implementation`` or a quantization method. So before transformers sees
a folder, :func:`verified_copy` walks all of it, refuses any ``.py`` file other than the remote
code ``to-hf`` writes (checked byte for byte), FIFOs and devices, and config keys that name
code, then hands transformers a fresh temporary folder holding only config.json, the
verified code and the safetensors weights: nothing else of the user's folder is reachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile

from nanomoe.errors import ConversionError
from nanomoe.files import check_regular_file, walk

from .remote_code import REMOTE_MODELS, RemoteModel, generate_files

# weights transformers reads as data; .bin files are unpickled by transformers, so not taken
WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
# config keys through which transformers fetches or runs code (at any depth of any config)
CODE_KEYS = {"auto_map", "custom_pipelines", "custom_generate", "trust_remote_code",
             "quantization_config", "kernel_config", "use_kernels"}
ATTN_KEYS = {"attn_implementation", "_attn_implementation", "_attn_implementation_internal"}
ATTN_BUILTIN = (None, "eager", "sdpa")  # anything else may name a kernel on the hub
MAX_ENTRIES = 10_000  # a model folder holds a few dozen files; more is not one
MAX_JSON_BYTES = 64 * 2**20
_WHY = ("transformers can run code it finds in a model folder, so nothing from the folder is "
        "loaded")


def _refuse(path: str, what: str) -> ConversionError:
    return ConversionError(f"{path}: {what}; {_WHY}: remove it (or load the folder yourself "
                           "if you trust it)")


def scan(folder: str, code_names: tuple[str, ...] = ()) -> None:
    """Refuse a folder holding a FIFO, socket or device anywhere (a reader would block), a
    ``custom_generate`` entry, or a ``.py`` file other than ``code_names`` at its top."""
    folder = os.path.normpath(folder)  # "hf/" too: its files' dirname is "hf"
    for path in walk(folder, MAX_ENTRIES, ConversionError):
        name, top = os.path.basename(path), os.path.dirname(path) == folder
        if name == "custom_generate":
            raise _refuse(path, "custom generation code (transformers runs it in generate())")
        if not os.path.isdir(path):
            check_regular_file(path, "model file", ConversionError)
        if name.endswith(".py") and not (top and name in code_names):
            raise _refuse(path, "a Python file that is not the remote code to-hf writes for "
                                "this model")


def read_bytes(path: str, limit: int) -> bytes:
    """A regular file's bytes (refused before reading when it is anything else or larger)."""
    check_regular_file(path, "model file", ConversionError)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never blocks on a FIFO
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped since the check
            raise ConversionError(f"{path} is no longer a regular file")
        if st.st_size > limit:
            raise ConversionError(f"{path} is {st.st_size} bytes, more than a model folder's "
                                  f"config or code ({limit}); restore it or export again")
        return f.read(limit + 1)[:limit]


def _check_keys(value, path: str, allowed_auto_map) -> None:
    """Refuse the keys of :data:`CODE_KEYS` and hub-kernel attention at any depth."""
    if isinstance(value, list):
        for v in value:
            _check_keys(v, path, allowed_auto_map)
    if not isinstance(value, dict):
        return
    for key, v in value.items():
        if key == "auto_map" and allowed_auto_map is not None and v == allowed_auto_map:
            continue
        if key in CODE_KEYS and v not in (None, False, {}):
            raise _refuse(path, f"its {key!r} entry names code or a kernel to load")
        if key in ATTN_KEYS and v not in ATTN_BUILTIN:
            raise _refuse(path, f"its {key}={str(v)[:60]!r} may name a kernel on the hub; "
                                f"only {', '.join(map(str, ATTN_BUILTIN[1:]))} are accepted")
        _check_keys(v, path, allowed_auto_map)


def check_configs(folder: str, spec: RemoteModel | None) -> bytes:
    """Check every ``*config*.json`` at the folder's top; returns config.json's bytes."""
    config = None
    for name in sorted(os.listdir(folder)):
        if not (name.endswith(".json") and "config" in name):
            continue
        path = os.path.join(folder, name)
        raw = read_bytes(path, MAX_JSON_BYTES)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ConversionError(f"{path} is not valid JSON ({str(e)[:80]}): restore it from "
                                  "the model's source or export the model again") from None
        _check_keys(data, path, spec.auto_map if spec and name == "config.json" else None)
        if name == "config.json":
            config = raw
    if config is None:
        raise ConversionError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return config


def _remote_type(spec: RemoteModel) -> str:
    return next(k for k, v in REMOTE_MODELS.items() if v is spec)


@contextlib.contextmanager
def verified_copy(folder: str, spec: RemoteModel | None = None):
    """Yields a fresh folder holding ``folder``'s config.json, the remote code of ``spec``
    (byte-identical to what to-hf writes now, else refused) and links to its safetensors
    weights; removed afterwards. ``spec`` None: the folder may hold no code at all."""
    code = generate_files(_remote_type(spec)) if spec else {}
    scan(folder, tuple(code))
    config = check_configs(folder, spec)
    texts = {}
    for name, text in code.items():
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.lexists(path) \
                or read_bytes(path, len(text.encode()) + 1) != text.encode():
            raise ConversionError(f"{path} differs from the code this version of nanomoe "
                                  "writes, so it is not run: export the model again with to-hf "
                                  "(or load it yourself with trust_remote_code=True)")
        texts[name] = text.encode()
    weights = [n for n in sorted(os.listdir(folder)) if WEIGHTS.fullmatch(n)]
    if not any(n.endswith(".safetensors") for n in weights):
        raise ConversionError(f"{folder}: no model.safetensors (weights in other formats are "
                              "not read here: save the model with save_pretrained, which "
                              "writes safetensors)")
    files = {"config.json": config, **texts}
    for name in weights:
        src = os.path.realpath(os.path.join(folder, name))
        files[name] = read_bytes(src, MAX_JSON_BYTES) if name.endswith(".json") else src
    parent = None
    try:
        parent = tempfile.mkdtemp(prefix="nanomoe-hf-")
        # transformers caches remote code under the folder's name: the code's hash keeps
        # that name the same for the same code, and apart for any other
        copy = os.path.join(parent, "nanomoe_" + hashlib.sha256(
            b"".join(texts.values())).hexdigest()[:12])
        _write_copy(copy, files)
    except OSError as e:
        if parent:
            shutil.rmtree(parent, ignore_errors=True)
        raise ConversionError(f"could not make the verified copy of {folder} in "
                              f"{tempfile.gettempdir()} ({e.strerror or e}): free space there "
                              "or point TMPDIR at another folder") from None
    try:
        yield copy
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _write_copy(copy: str, files: dict) -> None:
    """Bytes are written; a path (weights, read as data) is linked, not copied."""
    os.mkdir(copy)
    for name, data in files.items():
        if isinstance(data, bytes):
            with open(os.path.join(copy, name), "wb") as f:
                f.write(data)
        else:
            os.symlink(data, os.path.join(copy, name))
