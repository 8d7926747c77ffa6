"""Reading the original's .pt checkpoints (and ours) without the original's code."""

from __future__ import annotations

import os
import pickle
from typing import Any

from nanomoe.errors import ConversionError


class _Unknown:
    """Stands in for a class of the original's code (its config dataclass) when unpickling."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith(("torch", "collections", "numpy", "builtins", "_codecs")):
            return super().find_class(module, name)
        return _Unknown


class _PickleModule:
    Unpickler = _Unpickler
    load = pickle.load
    __name__ = "nanomoe_pickle"


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """The dict inside a .pt file: ``{'model', 'config', 'step'}`` or a bare state_dict.

    Plain files (ours) load with ``weights_only=True``; the original's, whose config is a
    pickled dataclass of its own code, load with that class replaced by a plain object.
    """
    import torch

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # the original's config dataclass: read it without importing its module
    except (RuntimeError, EOFError, OSError) as e:
        raise ConversionError(f"{path}: not a readable checkpoint ({e.__class__.__name__}); "
                              "the file may be truncated or of another format") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise ConversionError(f"{path}: not a readable checkpoint ({e})") from None


def load_state_dict_file(path: str) -> dict[str, Any]:
    """The model weights of a .pt checkpoint (``ckpt['model']`` or the file itself)."""
    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    raise ConversionError(f"{path}: holds no state_dict (expected a dict with 'model')")
