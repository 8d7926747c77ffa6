"""Token shard files, memory-mapped, never loaded whole: the original's ``.npy`` shards,
nanoGPT's headerless ``train.bin`` / ``val.bin`` and llm.c / modded-nanogpt ``.bin`` shards
(a 256 x int32 header, then uint16 tokens). Which files form a split: ``data.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_INTS = 256


def _check_tokens(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path} holds a {arr.dtype} array of shape {arr.shape}, not a 1-D "
                        "integer token array: write shards with python -m nanomoe.prepare")
    if len(arr) == 0:
        raise DataError(f"{path} holds no tokens: delete it or prepare the data again")
    return arr


def read_npy(path: str | Path) -> np.ndarray:
    """One ``.npy`` shard, memory-mapped."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path} as a .npy token shard ({e}): "
                        "the file is corrupt or not a NumPy array") from e
    return _check_tokens(arr, path)


def read_nanogpt_bin(path: str | Path) -> np.ndarray:
    """nanoGPT's headerless uint16 ``train.bin`` / ``val.bin``, memory-mapped."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise DataError(f"{path} has {size} bytes, not a whole number of uint16 tokens: "
                        "the file is empty or truncated, prepare it again")
    return np.memmap(path, dtype=np.uint16, mode="r")


def llmc_header(path: Path) -> np.ndarray | None:
    with open(path, "rb") as f:
        data = f.read(LLMC_HEADER_INTS * 4)
    return np.frombuffer(data, dtype="<i4") if len(data) == LLMC_HEADER_INTS * 4 else None


def read_llmc_bin(path: str | Path) -> np.ndarray:
    """An llm.c / modded-nanogpt shard: 256 x int32 header, then uint16 tokens, memory-mapped."""
    path = Path(path)
    header = llmc_header(path)
    if header is None or header[0] != LLMC_MAGIC:
        found = "a file shorter than the header" if header is None else f"magic {header[0]}"
        raise DataError(f"{path} is not an llm.c token shard (found {found}, expected magic "
                        f"{LLMC_MAGIC}): give llm.c/modded-nanogpt .bin shards, or name "
                        "nanoGPT's raw files train.bin/val.bin")
    if header[1] != LLMC_VERSION:
        raise DataError(f"{path} is llm.c shard version {header[1]}, only version "
                        f"{LLMC_VERSION} (uint16 tokens) is supported")
    ntok = int(header[2])
    expected = LLMC_HEADER_INTS * 4 + 2 * ntok
    size = path.stat().st_size
    if size != expected or ntok <= 0:
        raise DataError(f"{path} has {size} bytes but its header promises {ntok} tokens "
                        f"({expected} bytes): the file is truncated or corrupt, download it again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_INTS * 4, shape=(ntok,))
