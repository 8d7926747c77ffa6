"""Reading .pt files without ever running code from them.

A pickle can call any function it names, so every load goes through
``torch.load(weights_only=True)``, whose unpickler builds only an allow-list of tensor and
container types; that covers torch's zip format and the legacy (non-zip) one. Before loading,
the pickle's opcodes are walked (``pickle_scan.py``: decoded only, nothing built) to list the
globals it names:

* the original's config dataclass (``__main__.MoeGPTConfig``, ``model.GPTConfig``, ...) is
  admitted under its exact name as a plain attribute holder (:func:`_stand_in`), never imported;
* any other name torch does not allow is refused with one sentence that names it.

torch is imported where a file is loaded: nanomoe itself imports no framework.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from typing import Any

from .errors import ConversionError
from .files import check_regular_file
from .pickle_scan import PickleTooLarge, pickle_globals
from .weight_checks import check_tensors

# The original's config classes (any module): read as data, the only classes admitted by name.
CONFIG_CLASS_NAMES = ("GPTConfig", "ModernGPTConfig", "MoeGPTConfig", "nGPTConfig")


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


MAX_PICKLE_BYTES = 16 * 2**20  # a state_dict's pickle: ~150 bytes a tensor; they are stored apart


def _too_large(path: str) -> ConversionError:
    return ConversionError(f"{path}: its pickle is larger than {MAX_PICKLE_BYTES >> 20} MiB "
                           "(a checkpoint's is a few MiB at most: its tensors are stored "
                           "apart), so it was refused; the file is damaged or not a checkpoint")


def _globals(path: str) -> list[str]:
    try:  # MAX_PICKLE_BYTES read here, at call time: a test lowers it
        return pickle_globals(path, MAX_PICKLE_BYTES)
    except PickleTooLarge:
        raise _too_large(path) from None


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


_REUSED: dict | None = None  # within reuse_loads(): (path, mtime, size) -> what was loaded


@contextlib.contextmanager
def reuse_loads():
    """Within the block, loading the same unchanged file again returns the first result (the
    sampler checks a file through the conversion loader, then loads it its own way)."""
    global _REUSED
    _REUSED = {}
    try:
        yield
    finally:
        _REUSED = None


def load_checkpoint_file(path: str) -> dict[str, Any] | Any:
    """The object inside a .pt file (``{'model', 'config', 'step'}`` or a bare state_dict);
    no code from the file runs (see the module doc)."""
    check_regular_file(path, "checkpoint file", ConversionError)
    if _REUSED is None:
        return _load_checkpoint_file(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _REUSED:
        _REUSED[key] = _load_checkpoint_file(path)
    return _REUSED[key]


def _load_checkpoint_file(path: str) -> dict[str, Any] | Any:
    import torch

    try:
        admitted = _admit(path, _globals(path))
        with torch.serialization.safe_globals(admitted):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    if isinstance(ckpt, dict):
        model = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else ckpt
        check_tensors(model, path)
    return ckpt


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
    except RecursionError:
        raise ConversionError(f"{path} nests its JSON too deeply to be a config: restore it "
                              "from the model's source or export the model again") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({str(e)[:80]}): restore it from the "
                              "model's source or export the model again") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object: "
                              "restore it from the model's source or export the model again")
    return data
