"""Checks on a checkpoint's weights before any is used: string keys, floating-point dtypes, a
total size that fits the memory available, finite values; one sentence for each failure.

torch is imported where a torch state_dict is checked: nanomoe itself imports no framework."""

from __future__ import annotations

import os

import numpy as np

from .errors import ConversionError

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
    for key, value in arrays.items():
        value = np.asarray(value)
        floating = np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"
        if floating and not np.isfinite(value).all():
            raise non_finite_error(where, key)
