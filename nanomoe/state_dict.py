"""Framework-free helpers for the original's state_dict keys."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")

# torch.compile wraps the model as `_orig_mod`; DDP wraps it as `module`.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Drop the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) key prefixes, nested too."""
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out
