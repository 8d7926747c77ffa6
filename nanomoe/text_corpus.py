"""Text as one token stream: the embedded default corpus (the Python standard library's own
source, so training needs no download) and the tokenising of text files, done once."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from .errors import DataError
from .tokenizer import Tokenizer, encode_array

DEFAULT_CORPUS_BYTES = 8 * 2**20

# Folders of the standard library that are not ordinary library code (or are huge test data).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
              "lib2to3", "turtledemo", "ensurepip", "__pycache__"}


def _stdlib_files() -> list[Path]:
    roots = [sysconfig.get_paths()["stdlib"], os.path.dirname(os.__file__)]
    for root in map(Path, roots):
        files = [p for p in root.rglob("*.py")
                 if not any(d in _SKIP_DIRS or d.startswith("config-")
                            for d in p.relative_to(root).parts[:-1])]
        if files:
            return sorted(files, key=lambda p: p.relative_to(root).as_posix())
    return []


def embedded_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The standard library's ``*.py`` source in sorted order, cut at ``max_bytes`` of UTF-8.

    Needs no network and no package; the same text for the same Python installation.
    """
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    parts, total = [], 0
    for path in _stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue  # an unreadable file in an odd installation: the rest is plenty
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not parts:
        raise DataError("found no Python standard library source to use as the default corpus: "
                        "give training data with --data")
    # Cut by bytes, then drop a multi-byte character split by the cut.
    return b"".join(parts)[:max_bytes].decode("utf-8", errors="ignore")


_TEXT_CACHE: dict = {}  # one entry: train and val of the same text are tokenised once


def tokenise_once(key, tokenizer: Tokenizer, texts) -> np.ndarray:
    """The tokens of ``texts()`` joined by the tokenizer's eot; ``key`` names the text, so a
    second call (the val split after train) reuses them."""
    key = (key, tokenizer.name)
    if key not in _TEXT_CACHE:
        pieces = []
        for i, text in enumerate(texts()):
            if i and tokenizer.eot is not None:
                pieces.append(np.array([tokenizer.eot], dtype=np.uint32))
            pieces.append(encode_array(tokenizer, text))
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
        _TEXT_CACHE.clear()
        _TEXT_CACHE[key] = tokens.astype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
    return _TEXT_CACHE[key]
