"""Text -> token shards in the original's format (its ``fineweb.py``, plus local files).

    python -m nanomoe.prepare --fineweb                       # FineWeb-Edu sample-10BT, GPT-2
    python -m nanomoe.prepare notes.txt docs/ --out data --tokenizer byte --shard_size 1000000

Every document is preceded by the tokenizer's end-of-text id (50256 for gpt2; the byte tokenizer
has none, so its documents are simply concatenated). The token stream is cut into shards of
``--shard_size`` uint16 tokens: ``{prefix}_val_000000.npy`` first, then
``{prefix}_train_000001.npy``, ... (``--format bin`` writes the same split as nanoGPT's
``val.bin`` / ``train.bin``). Inputs: ``.txt`` files (one document each), ``.jsonl`` (one
document per line, its "text" field) and ``.parquet`` (its "text" column), or folders of them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

try:
    from tqdm import tqdm
except ImportError:  # a line per shard without it
    tqdm = None

from .documents import FINEWEB, find_inputs, fineweb_documents, iter_documents
from .errors import DataError, NanoMoeError
from .tokenizer import get_tokenizer

# ---------------------------------------------------------------------------------------------
# tokenising (in worker processes)

_TOKENIZER = None


def _init_worker(tokenizer_name: str) -> None:
    global _TOKENIZER
    _TOKENIZER = get_tokenizer(tokenizer_name)


def tokenize_document(text: str) -> np.ndarray:
    """``[eot] + tokens`` as uint16, checked to fit (runs in a worker after ``_init_worker``)."""
    tok = _TOKENIZER
    if hasattr(tok, "encode_array"):
        ids = tok.encode_array(text).astype(np.int64)
    else:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
    if tok.eot is not None:
        ids = np.concatenate([np.array([tok.eot], np.int64), ids])
    limit = min(tok.vocab_size, 2**16)
    if ids.size and (ids.max() >= limit or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= limit else int(ids.min())
        raise DataError(f"tokenizer {tok.name} produced token id {bad}, outside [0, {limit}) "
                        f"(vocab_size {tok.vocab_size}, uint16 shards): the tokenizer is broken "
                        "or its vocab is too large for uint16 shards")
    return ids.astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# writing


class _Progress:
    """A tqdm bar per shard as the original, or a line per shard without tqdm."""

    def __init__(self, shard_size: int, quiet: bool = False):
        self.shard_size, self.quiet, self.bar = shard_size, quiet, None
        self.tqdm = None if quiet else tqdm

    def update(self, index: int, n: int) -> None:
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=self.shard_size, unit="tokens", desc=f"Shard {index}")
            self.bar.update(n)

    def shard_done(self, path: Path, n: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.quiet:
            print(f"wrote {path} ({n:,} tokens)", flush=True)


def shard_path(out_dir: Path, prefix: str, index: int, fmt: str = "npy") -> Path:
    split = "val" if index == 0 else "train"
    return out_dir / (f"{split}.bin" if fmt == "bin" else f"{prefix}_{split}_{index:06d}.npy")


def _write_shard(out_dir: Path, prefix: str, index: int, tokens: np.ndarray, fmt: str) -> Path:
    path = shard_path(out_dir, prefix, index, fmt)
    if fmt == "bin":  # val.bin is shard 0; every later shard is appended to train.bin
        with open(path, "ab") as f:
            tokens.tofile(f)
    else:  # write, then rename: an interrupted run leaves no half shard that reads as data
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as f:
            np.save(f, tokens)
        os.replace(part, path)
    return path


def write_shards(documents: Iterable[str], out_dir: str | Path, tokenizer: str = "gpt2",
                 prefix: str = "edufineweb", shard_size: int = 10**8, workers: int = 1,
                 fmt: str = "npy", quiet: bool = False) -> list[Path]:
    """Tokenise ``documents`` (``workers`` processes) into shards in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _init_worker(tokenizer)  # here too: fails early, and serves workers=1 without a pool
    progress = _Progress(shard_size, quiet)
    buf = np.empty(shard_size, dtype=np.uint16)
    index, count, written = 0, 0, []

    # spawn, not fork: forking a process whose threads hold locks (JAX, tokenizers) can deadlock
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    try:
        docs = pool.imap(tokenize_document, documents, chunksize=16) if pool else \
            map(tokenize_document, documents)
        for tokens in docs:
            # A document that does not fit continues in the next shard, as in the original.
            while len(tokens):
                take = min(len(tokens), shard_size - count)
                buf[count:count + take] = tokens[:take]
                count, tokens = count + take, tokens[take:]
                progress.update(index, take)
                if count == shard_size:
                    written.append(_write_shard(out_dir, prefix, index, buf, fmt))
                    progress.shard_done(written[-1], count)
                    index, count = index + 1, 0
        if count:
            written.append(_write_shard(out_dir, prefix, index, buf[:count], fmt))
            progress.shard_done(written[-1], count)
    finally:
        if pool is not None:
            pool.terminate()
    if not written:
        raise DataError("the inputs hold no text: nothing to write")
    return list(dict.fromkeys(written))  # train.bin appears once


def _clear_output(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder: choose another --out")
    if any(out_dir.iterdir()):
        if not force:
            raise DataError(f"output folder {out_dir} is not empty: pass --force to replace its "
                            "shards, or choose another --out")
        # Only what open_dataset would read as shards: stale ones would mix into the new data.
        for p in out_dir.iterdir():
            if p.is_file() and (p.name in ("train.bin", "val.bin") or (
                    p.suffix == ".npy" and ("_train_" in p.name or "_val_" in p.name))):
                p.unlink()


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanomoe.prepare",
        description="Tokenise FineWeb-Edu or local text into uint16 shards (the original's "
                    "format: {prefix}_val_000000.npy, {prefix}_train_000001.npy, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="*",
                   help=".txt (one document each), .jsonl ('text' field per line), .parquet "
                        "('text' column) files or folders of them")
    p.add_argument("--fineweb", action="store_true",
                   help=f"download and tokenise {FINEWEB} (needs the datasets package)")
    p.add_argument("--fineweb_name", default="sample-10BT", help="the FineWeb-Edu subset")
    p.add_argument("--max_docs", type=int, default=None,
                   help="stop after this many documents (--fineweb then streams: no full download)")
    p.add_argument("--out", default=None,
                   help="output folder; default edu_fineweb10B with --fineweb")
    p.add_argument("--prefix", default="edufineweb", help="shard file name prefix")
    p.add_argument("--tokenizer", default="gpt2", help="byte | gpt2 | PATH/tokenizer.json")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenising processes")
    p.add_argument("--format", choices=["npy", "bin"], default="npy",
                   help="npy: the original's shards; bin: nanoGPT's val.bin/train.bin")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, deleting the shards already there")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.fineweb == bool(args.inputs):
        p.error("give input files/folders or --fineweb (one of the two)")
    for name in ("shard_size", "workers"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.out and not args.fineweb:
        p.error("--out is required for local inputs")
    out = Path(args.out or "edu_fineweb10B")
    try:
        tok = get_tokenizer(args.tokenizer)
        if tok.vocab_size > 2**16:
            raise DataError(f"tokenizer {tok.name} has vocab_size {tok.vocab_size}, too large "
                            "for uint16 shards: use a tokenizer with at most 65536 tokens")
        if args.fineweb:
            docs = fineweb_documents(args.fineweb_name, streaming=args.max_docs is not None)
        else:
            docs = iter_documents(find_inputs(args.inputs))
        if args.max_docs is not None:
            docs = (d for _, d in zip(range(args.max_docs), docs))
        _clear_output(out, args.force)
        paths = write_shards(docs, out, args.tokenizer, args.prefix, args.shard_size,
                             args.workers, args.format, args.quiet)
    except (NanoMoeError, OSError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    if len(paths) == 1:
        print(f"prepare: note: everything went into the val shard {paths[0]}; pass a smaller "
              "--shard_size to get train shards", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
