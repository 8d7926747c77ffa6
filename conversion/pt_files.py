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

import collections
import contextlib
import json
import os
import pickle
import pickletools
import zipfile
import zlib
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


MAX_PICKLE_BYTES = 16 * 2**20  # a state_dict's pickle: ~150 bytes a tensor; they are stored apart


class _TooLarge(Exception):
    pass


class _Bounded:
    """A read-only stream that refuses to hand out more than ``limit`` bytes in all (a length
    field of 2**60 in a pickle, a zip member inflating to GiBs) before reading them."""

    def __init__(self, f, limit: int = MAX_PICKLE_BYTES):
        self.f, self.left = f, limit

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > self.left:
            raise _TooLarge
        data = self.f.read(self.left + 1 if n is None or n < 0 else n)
        if len(data) > self.left:
            raise _TooLarge
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.f.readline(self.left + 1)
        if len(line) > self.left:
            raise _TooLarge
        self.left -= len(line)
        return line


def _too_large(path: str) -> ConversionError:
    return ConversionError(f"{path}: its pickle is larger than {MAX_PICKLE_BYTES >> 20} MiB "
                           "(a checkpoint's is a few MiB at most: its tensors are stored "
                           "apart), so it was refused; the file is damaged or not a checkpoint")


def _globals_in(stream) -> list[str]:
    """The dotted names the pickle at ``stream`` refers to (GLOBAL, INST, STACK_GLOBAL); the
    opcodes are only decoded, one at a time, and only the last two pushed strings and the
    memoised strings are kept. A STACK_GLOBAL whose strings cannot be traced is listed as
    ``'?.?'``, which no allow-list holds."""
    found: dict[str, None] = {}
    recent: collections.deque = collections.deque([None, None], maxlen=2)
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found[str(arg).replace(" ", ".")] = None
        elif name == "STACK_GLOBAL":
            a, b = recent
            found[f"{a or '?'}.{b or '?'}"] = None
        if name == "MEMOIZE" or name in _PUT_OPS:
            key = len(memo) if name == "MEMOIZE" else arg
            if recent[-1] is not None:
                memo[key] = recent[-1]
            else:
                memo.pop(key, None)
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name not in ("FRAME", "PROTO"):
            recent.append(None)
    return list(found)


def pickle_globals(path: str) -> list[str]:
    """Every global named by the pickles in ``path``: the ``*.pkl`` members of a zip checkpoint,
    or the leading pickles of a legacy file (or of a raw pickle). Best effort: it serves the
    messages; ``torch.load(weights_only=True)`` is what enforces safety. A pickle larger than
    MAX_PICKLE_BYTES is refused (one sentence) before torch.load would read it whole."""
    found: list[str] = []
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # how torch itself tells the formats apart
        f.seek(0)
        if zipped:
            try:
                with zipfile.ZipFile(f) as z:
                    for info in z.infolist():
                        if info.filename.endswith(".pkl"):
                            if info.file_size > MAX_PICKLE_BYTES:
                                raise _TooLarge
                            with z.open(info) as member:
                                found += _globals_in(_Bounded(member))
            except _TooLarge:
                raise _too_large(path) from None
            except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError,
                    NotImplementedError, RuntimeError, zlib.error):
                pass  # torch.load reports the damage
            return found
        bounded = _Bounded(f)
        for _ in range(_LEGACY_PICKLES):
            try:
                found += _globals_in(bounded)
            except _TooLarge:
                raise _too_large(path) from None
            except (ValueError, EOFError, KeyError, IndexError, UnicodeDecodeError,
                    OverflowError, MemoryError):
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
        admitted = _admit(path, pickle_globals(path))
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


FLOAT_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64")


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; the free pages where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62


def check_tensors(state: dict, path: str) -> None:
    """One sentence for what no model holds: a key that is not a string, weights that are not
    floating point (float8, complex, integers), tensors claiming more memory than there is
    (a stride-0 view repeats a few stored bytes into terabytes) or NaN/inf weights."""
    import torch

    total, largest = 0, None
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConversionError(f"{path}: its state_dict has a key {key!r} that is not a "
                                  "string (a weight's name); the file is not a checkpoint")
        if not torch.is_tensor(value):
            continue
        if str(value.dtype) not in FLOAT_DTYPES:
            raise ConversionError(f"{path}: {key} is {str(value.dtype)[6:]}, but weights must "
                                  "be float16, bfloat16, float32 or float64; convert them "
                                  "with torch first")
        size = value.numel() * max(value.element_size(), 4)  # read as fp32 (or fp64)
        total += size
        if largest is None or size > largest[1]:
            largest = (key, size, tuple(value.shape))
    free = available_memory()
    if total > free:
        key, _, shape = largest
        raise ConversionError(f"{path}: its tensors need {total / 2**30:.1f} GiB (the largest, "
                              f"{key}, has shape {shape}), more than the {free / 2**30:.1f} GiB "
                              "of memory available; the file is damaged or crafted, or needs a "
                              "larger machine")
    for key, value in state.items():
        if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
            raise non_finite_error(path, key)


def non_finite_error(where: str, key: str) -> ConversionError:
    """The one sentence for NaN/inf weights, the same for a .pt file, a safetensors folder and
    a JAX checkpoint folder (``where``: the path as the user gave it; ``key``: the first
    non-finite weight under the original's names)."""
    return ConversionError(f"{where}: the weights hold non-finite values (first: {key}); the "
                           "file is damaged or its run diverged: use an earlier checkpoint")


def check_finite_arrays(arrays: dict, where: str) -> None:
    """Refuse NaN/inf in ``arrays`` (NumPy-like, the original's keys in their order) with
    :func:`non_finite_error` naming the first such key; non-float arrays are skipped
    (bfloat16 is a float here, though NumPy does not count it as np.floating)."""
    import numpy as np

    for key, value in arrays.items():
        value = np.asarray(value)
        floating = np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"
        if floating and not np.isfinite(value).all():
            raise non_finite_error(where, key)


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
