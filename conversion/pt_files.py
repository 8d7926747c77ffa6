"""Reading .pt files without ever running code from them.

A pickle can call any function it names, so every load goes through
``torch.load(weights_only=True)``, whose unpickler builds only an allow-list of tensor and
container types; that covers torch's zip format and the legacy (non-zip) one. Before loading,
the pickle's opcodes are walked (decoded only, nothing built) to list the globals it names:

* the original's config dataclass (``__main__.MoeGPTConfig``, ``model.GPTConfig``, ...) is
  admitted under its exact name as a plain attribute holder (:func:`_stand_in`), never imported;
* any other name torch does not allow is refused with one sentence that names it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import zipfile
from typing import Any

from nanomoe.errors import ConversionError
from nanomoe.files import check_regular_file

# The original's config classes (any module): read as data, the only classes admitted by name.
CONFIG_CLASS_NAMES = ("GPTConfig", "ModernGPTConfig", "MoeGPTConfig", "nGPTConfig")
_LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, storage keys; then raw bytes
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
               "BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class _Unknown:
    """Stands in for a class of the original's code (its config dataclass) when unpickling;
    keeps the attributes, and the class name in ``type(obj).__name__``."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) as pickle writes it
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})


def _stand_in(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_Unknown,), {"__module__": module, "__qualname__": name})


def _globals_in(stream) -> list[str]:
    """The dotted names the pickle at ``stream`` refers to (GLOBAL, INST, STACK_GLOBAL); the
    opcodes are only decoded. A STACK_GLOBAL whose strings cannot be traced is listed as
    ``'?.?'``, which no allow-list holds."""
    found: list[str] = []
    recent: list[str | None] = []  # what each pushing opcode left on top, strings only
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            a, b = (recent[-2:] if len(recent) >= 2 else [None, None])
            found.append(f"{a or '?'}.{b or '?'}")
        if name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT_OPS:
            memo[arg] = recent[-1] if recent else None
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name not in ("FRAME", "PROTO"):
            recent.append(None)
    return found


def pickle_globals(path: str) -> list[str]:
    """Every global named by the pickles in ``path``: the ``*.pkl`` members of a zip checkpoint,
    or the leading pickles of a legacy file (or of a raw pickle). Best effort: it serves the
    messages; ``torch.load(weights_only=True)`` is what enforces safety."""
    found: list[str] = []
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # how torch itself tells the formats apart
        f.seek(0)
        if zipped:
            try:
                with zipfile.ZipFile(f) as z:
                    for member in z.namelist():
                        if member.endswith(".pkl"):
                            found += _globals_in(io.BytesIO(z.read(member)))
            except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError):
                pass  # torch.load reports the damage
            return found
        for _ in range(_LEGACY_PICKLES):
            try:
                found += _globals_in(f)
            except (ValueError, EOFError, KeyError, IndexError, UnicodeDecodeError):
                break  # past the pickles: raw storage bytes, or damage torch.load reports
    return found


def _torch_allowed() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return set(_get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: let torch.load alone decide
        return set()


def _admit(path: str, names: list[str]) -> list[tuple[type, str]]:
    """(stand-in, name) pairs for the config classes; refuses any other unknown name."""
    allowed, stand_ins = _torch_allowed(), {}
    for full in dict.fromkeys(names):
        module, _, cls = full.rpartition(".")
        if cls in CONFIG_CLASS_NAMES and module and "?" not in full:
            stand_ins[full] = _stand_in(full)
        elif allowed and full not in allowed:
            raise ConversionError(f"{path}: refers to {full}, which a checkpoint may not "
                                  "contain; nothing from it was run (only tensors, plain "
                                  "containers and the original's config are read)")
    return [(cls, full) for full, cls in stand_ins.items()]


def load_checkpoint_file(path: str) -> dict[str, Any] | Any:
    """The object inside a .pt file (``{'model', 'config', 'step'}`` or a bare state_dict);
    no code from the file runs (see the module doc)."""
    import torch

    check_regular_file(path, "checkpoint file", ConversionError)
    try:
        admitted = _admit(path, pickle_globals(path))
        with torch.serialization.safe_globals(admitted):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if line.startswith(("Unsupported", "Trying"))),
                   lines[0] if lines else "")[:160]
        raise ConversionError(f"{path}: holds objects a checkpoint may not contain, so it was "
                              f"refused and nothing from it was run ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, zipfile.BadZipFile) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{path}: not a readable checkpoint ({e.__class__.__name__}); "
                              "the file may be truncated or of another format") from None


def load_state_dict_file(path: str) -> dict[str, Any]:
    """The model weights of a .pt checkpoint (``ckpt['model']`` or the file itself)."""
    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    raise ConversionError(f"{path}: holds no state_dict (expected a dict with 'model')")


def read_config_json(folder: str) -> dict | None:
    """``folder``/config.json as a dict; None where there is none; one sentence where it is
    not a JSON object (rather than the hub's "not found" later)."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        return None
    check_regular_file(path, "config.json file", ConversionError)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({str(e)[:80]}): restore it from the "
                              "model's source or export the model again") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object: "
                              "restore it from the model's source or export the model again")
    return data
