"""Token data: shard formats, text, the embedded default corpus (batches: nanomoe.loader).

Every source ends up as a :class:`TokenSplit`: a list of 1-D integer arrays ("shards") read the
same way afterwards. Binary shards are memory-mapped, never loaded whole.

``open_dataset(data, tokenizer, split)`` recognises, in this order:

* ``*.npy`` shards (the original's FineWeb-Edu prep: uint16, ``edufineweb_val_000000.npy``,
  ``edufineweb_train_000001.npy``, ...): the split is every file whose *name* contains
  ``train`` / ``val``, in sorted order, as in the original.
* nanoGPT's ``train.bin`` / ``val.bin``: raw uint16 tokens, no header.
* llm.c / modded-nanogpt ``*.bin`` shards: a 256 x int32 header (magic 20240520, version 1,
  token count) then uint16 tokens; the split is chosen by name as for ``.npy``.
* ``.txt`` text, tokenised when opened: the first 90% of the token stream is ``train``, the last
  10% ``val`` (files of a folder are read in sorted order, joined by the tokenizer's eot).
* nothing (``data=None``): the corpus shipped with the package (Shakespeare's plays, 1.1 MB,
  ``nanomoe/corpus/``), so that training works without a download.

``data`` is a folder or a single file, taken literally (``[``, ``*`` and ``?`` are characters of
the name, not a pattern); for modded-nanogpt's ``fineweb_train_*.bin`` give their folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .files import check_regular_file
from .shard_formats import LLMC_MAGIC, llmc_header, read_llmc_bin, read_nanogpt_bin, read_npy
from .text_corpus import DEFAULT_CORPUS_BYTES, embedded_corpus, tokenise_once
from .tokenizer import ByteTokenizer, Tokenizer, get_tokenizer

SPLITS = ("train", "val")
VAL_FRACTION = 0.1  # of a text token stream


@dataclass
class TokenSplit(Sequence):
    """The shards of one split: a sequence of 1-D token arrays plus their names for messages."""

    shards: list[np.ndarray] = field(repr=False)
    names: list[str]
    format: str  # "npy" | "nanogpt" | "llmc" | "text" | "embedded"
    source: str
    split: str = "train"

    def __getitem__(self, i):
        return self.shards[i]

    def __len__(self):
        return len(self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)


def _split_text(tokens: np.ndarray, split: str, source: str, fmt: str) -> TokenSplit:
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    part = tokens[:cut] if split == "train" else tokens[cut:]
    if len(part) == 0:
        raise DataError(f"{source} has only {len(tokens)} tokens, too few for a {split} split "
                        f"(the last {VAL_FRACTION:.0%} is val): give more text")
    return TokenSplit([part], [f"{source} ({split})"], fmt, source, split)


# ---------------------------------------------------------------------------------------------
# dispatch


def _regular(files: list[Path]) -> list[Path]:
    # a FIFO would block the reader and a device never ends: refuse them before opening
    for p in files:
        check_regular_file(p, "data file", DataError)
    return files


def _candidate_files(data: str) -> list[Path]:
    # A path is read as written, never expanded as a pattern: --data 'book[1].txt' must not
    # train on book1.txt (and run.json records the path it was given).
    path = Path(data)
    if not path.exists():
        pattern = " (paths are not expanded as patterns)" if any(c in data for c in "*?[") \
            else ""
        raise DataError(f"data path {data} does not exist{pattern}: give a folder of token "
                        "shards, a text file, or no --data for the built-in corpus")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.is_dir())
        if not files:
            raise DataError(f"data folder {data} is empty: prepare shards into it with "
                            "python -m nanomoe.prepare")
        return _regular(files)
    return _regular([path])


def _is_nanogpt(path: Path) -> bool:
    # A raw uint16 file cannot start with the llm.c magic if its ids are < 50257
    # (20240520 = tokens 55240, 308), so the magic tells the two .bin kinds apart.
    if path.name not in ("train.bin", "val.bin"):
        return False
    header = llmc_header(path)
    return header is None or header[0] != LLMC_MAGIC


def _classify(data: str) -> tuple[str, list[Path]]:
    files = _candidate_files(data)
    kinds = {
        "npy": [p for p in files if p.suffix == ".npy"],
        "nanogpt": [p for p in files if p.suffix == ".bin" and _is_nanogpt(p)],
        "llmc": [p for p in files if p.suffix == ".bin" and not _is_nanogpt(p)],
        "text": [p for p in files if p.suffix == ".txt"],
    }
    for kind, found in kinds.items():
        if found:
            return kind, found
    names = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
    raise DataError(f"{data} has no recognised data files (found {names}): expected *.npy "
                    "shards, train.bin/val.bin, llm.c *.bin shards or *.txt files")


def data_format(data: str | None) -> str:
    """What ``open_dataset`` would read: "embedded" | "npy" | "nanogpt" | "llmc" | "text"."""
    return "embedded" if data is None else _classify(str(data))[0]


def default_tokenizer(data: str | None) -> str:
    """gpt2 for token shards (the original's ids), byte for text and the embedded corpus."""
    return "byte" if data_format(data) in ("text", "embedded") else "gpt2"


def open_dataset(data: str | os.PathLike | None, tokenizer: Tokenizer | str | None = None,
                 split: str = "train", *, max_bytes: int = DEFAULT_CORPUS_BYTES) -> TokenSplit:
    """The ``split`` ("train" | "val") of ``data`` as memory-mapped shards (see the module doc).

    ``tokenizer`` (an object or a name for :func:`get_tokenizer`) is used for text only and
    defaults to bytes; token shards are read as they are. ``max_bytes`` caps the embedded corpus.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {SPLITS}")
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    if data is None:
        tok = tokenizer or ByteTokenizer()
        tokens = tokenise_once(("<embedded>", max_bytes), tok,
                                lambda: [embedded_corpus(max_bytes)])
        return _split_text(tokens, split, "the embedded corpus (Shakespeare)", "embedded")

    try:
        return _open_files(str(data), tokenizer, split)
    except OSError as e:  # permissions, a file vanishing, an I/O error
        raise DataError(f"cannot read {e.filename or data} ({e.strerror or e}): check that it "
                        "exists and is readable") from e


def _open_files(data: str, tokenizer: Tokenizer | None, split: str) -> TokenSplit:
    kind, files = _classify(data)
    if kind == "text":
        tok = tokenizer or ByteTokenizer()
        key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        tokens = tokenise_once(key, tok,
                                lambda: (p.read_text("utf-8", errors="replace") for p in files))
        return _split_text(tokens, split, data, "text")

    if kind == "nanogpt":
        chosen = [p for p in files if p.name == f"{split}.bin"]
    else:
        chosen = [p for p in files if split in p.name]
    if not chosen:
        names = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        want = f"{split}.bin" if kind == "nanogpt" else f"a file name containing '{split}'"
        raise DataError(f"no {split} shard in {data} ({want}); found: {names}")
    reader = {"npy": read_npy, "nanogpt": read_nanogpt_bin, "llmc": read_llmc_bin}[kind]
    return TokenSplit([reader(p) for p in chosen], [str(p) for p in chosen], kind, data, split)
