"""HellaSwag accuracy, completion style, as build-nanogpt scores it (framework-free, NumPy only).

Each example is a context and 4 candidate endings. Every ending is appended to the context
(``encode(ctx) + encode(" " + ending)``) and the model's mean cross-entropy over the ending's
tokens is computed; the ending with the lowest mean loss is the model's pick ("acc_norm").
The framework supplies ``logits_fn(tokens (4, T) int32) -> logits (4, T, V)``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import NanoMoeError
from .files import check_regular_file

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"


class HellaSwagError(NanoMoeError, ValueError):
    """A HellaSwag file that cannot be found, downloaded or read."""


def iterate_examples(path: str | Path, limit: int | None = None) -> Iterator[dict]:
    """Yield the examples of a HellaSwag jsonl file (``ctx``, 4 ``endings``, ``label``)."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in _lines(f, path):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ok = (isinstance(ex["ctx"], str) and len(ex["endings"]) == 4
                      and all(isinstance(e, str) for e in ex["endings"])
                      and int(ex["label"]) in range(4))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise HellaSwagError(f"{path} line {lineno} is not a HellaSwag example (a JSON "
                                     "object with a string 'ctx', 4 string 'endings' and a "
                                     "'label' in 0..3): check the file")
            try:  # valid JSON may hold a lone surrogate ("\ud800"), which no tokenizer encodes
                "".join([ex["ctx"], *ex["endings"]]).encode("utf-8")
            except UnicodeEncodeError:
                raise HellaSwagError(f"{path} line {lineno} holds a lone surrogate (such as "
                                     "\\ud800), which is not text: fix or remove that "
                                     "line") from None
            yield ex
            n += 1


def _lines(f, path):
    """(line number, line) of an open text file; bytes that are not UTF-8 are one sentence
    (the decoder reads ahead in blocks, so the line it fails on is not known)."""
    try:
        yield from enumerate(f, 1)
    except UnicodeDecodeError:
        raise HellaSwagError(f"{path} holds bytes that are not UTF-8 text: check the "
                             "file") from None


def check_file(path: str | Path, tokenizer, max_len: int, limit: int | None = None) -> None:
    """Read and render every example that evaluation will score, before training starts,
    so a bad line is reported before anything is written rather than at the first eval."""
    n = 0
    for ex in iterate_examples(path, limit):
        render_example(ex, tokenizer, max_len)
        n += 1
    if n == 0:
        raise HellaSwagError(f"{path} holds no HellaSwag examples: check the file")


def render_example(example: dict, tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Return ``(tokens (4, T) int32, mask (4, T) int32, label)``.

    Row i is the context followed by ending i; the mask is 1 over the ending. Rows are padded
    with 0 (mask 0) to the longest. A row longer than ``max_len`` loses context from the left;
    the ending is kept whole, so it must fit in ``max_len`` with at least one context token.
    """
    ctx = tokenizer.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        if len(end) > max_len - (1 if ctx else 0):
            raise HellaSwagError(f"a HellaSwag ending is {len(end)} tokens, which leaves no room "
                                 f"for context in a block of {max_len}: use a larger block size "
                                 "(--T)")
        c = ctx[len(ctx) + len(end) - max_len:] if len(ctx) + len(end) > max_len else ctx
        rows.append(c + end)
        masks.append([0] * len(c) + [1] * len(end))
    T = max(len(r) for r in rows)
    tokens = np.zeros((4, T), dtype=np.int32)
    mask = np.zeros((4, T), dtype=np.int32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = r
        mask[i, :len(m)] = m
    return tokens, mask, int(example["label"])


def ending_losses(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean cross-entropy per row of predicting ``tokens[:, 1:]`` where ``mask[:, 1:] == 1``."""
    logits = np.asarray(logits)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape or tokens.shape != mask.shape:
        raise HellaSwagError(f"logits of shape {logits.shape} do not fit tokens of shape "
                             f"{tokens.shape} and mask of shape {mask.shape}: logits_fn must "
                             "return (B, T, V) for a (B, T) batch")
    x = logits[:, :-1].astype(np.float32)  # bf16 and friends: score in float32
    target = tokens[:, 1:].astype(np.int64)
    m = (mask[:, 1:] == 1).astype(np.float64)
    # Stable log-softmax: nll = logsumexp(x) - x[target], with the max taken out first.
    xmax = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - xmax).sum(axis=-1)) + xmax[..., 0]
    picked = np.take_along_axis(x, target[..., None], axis=-1)[..., 0]
    nll = (lse - picked).astype(np.float64)
    count = m.sum(axis=1)
    if (count == 0).any():
        raise HellaSwagError("a HellaSwag row has no scored ending token (the ending must follow "
                             "at least one context token): check the mask")
    return (nll * m).sum(axis=1) / count


def pick_ending(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> int:
    """The acc_norm choice: the row whose ending has the lowest mean loss (first on a tie)."""
    return int(np.argmin(ending_losses(logits, tokens, mask)))


def evaluate(logits_fn: Callable[[np.ndarray], np.ndarray], path: str | Path, tokenizer,
             max_len: int, limit: int | None = None) -> dict:
    """Score the examples of ``path`` (the first ``limit`` of them): ``{acc_norm, n}``.

    ``logits_fn`` is called once per example with its (4, T) int32 batch.
    """
    n = correct = 0
    for ex in iterate_examples(path, limit):
        tokens, mask, label = render_example(ex, tokenizer, max_len)
        logits = np.asarray(logits_fn(tokens))
        correct += pick_ending(logits, tokens, mask) == label
        n += 1
    if n == 0:
        raise HellaSwagError(f"{path} holds no HellaSwag examples: check the file")
    return {"acc_norm": correct / n, "n": n}


def download(dest_dir: str | Path) -> Path:
    """Fetch the HellaSwag validation split into ``dest_dir`` unless it is already there."""
    dest = Path(dest_dir) / FILENAME
    if dest.is_file():
        return dest
    tmp = dest.with_name(f"{FILENAME}.{os.getpid()}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(URL, timeout=60) as r:
            data = r.read()
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except Exception as e:  # offline: URLError, timeouts, HTTP errors, a read-only folder, ...
        tmp.unlink(missing_ok=True)
        raise HellaSwagError(f"could not download HellaSwag from {URL} to {dest} "
                             f"({type(e).__name__}: {str(e)[:120]}): pass --hellaswag_file PATH "
                             f"to a local copy of {FILENAME}") from e
    return dest


def find_or_download(hellaswag_file: str | Path | None, cache_dir: str | Path) -> Path:
    """``hellaswag_file`` if given (it must exist), else the validation split in ``cache_dir``."""
    if hellaswag_file:
        path = Path(hellaswag_file)
        if path.exists():  # a folder, FIFO or device: one sentence, never a blocking open
            check_regular_file(path, "HellaSwag file", HellaSwagError)
        if not path.is_file():
            raise HellaSwagError(f"HellaSwag file {path} does not exist: give the path to a "
                                 f"local copy of {FILENAME}, or leave --hellaswag_file out to "
                                 "download it")
        return path
    return download(cache_dir)
