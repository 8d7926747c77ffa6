"""The rotary-embedding table, computed once in float64 and shared by both frameworks."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def rope_table(block_size: int, head_dim: int, base: float) -> np.ndarray:
    """(block_size, head_dim) float32: sin(t / base^(2i/hd)) at column 2i, cos at 2i+1.

    The original builds the same table in float32; float64 then rounding is the exact value,
    so both frameworks agree bit for bit (the buffer is not saved in checkpoints).
    """
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freq = np.arange(block_size, dtype=np.float64)[:, None] * inv_freq[None, :]
    table = np.empty((block_size, head_dim), np.float64)
    table[:, 0::2] = np.sin(freq)
    table[:, 1::2] = np.cos(freq)
    table = table.astype(np.float32)
    table.setflags(write=False)
    return table
