"""Text as one token stream: the embedded default corpus (Shakespeare, shipped with the
package, so training needs no download) and the tokenising of text files, done once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .tokenizer import Tokenizer, encode_array

DEFAULT_CORPUS_BYTES = 8 * 2**20
# Shakespeare's plays (public domain) as Karpathy's char-rnn collected them ("tinyshakespeare",
# 1.1 MB): at nanoGPT's quick-start loss (about 1.9 nats a byte) a byte-level model's sample
# already reads as verse; the Python source used before read as noise at the same loss.
CORPUS_FILE = Path(__file__).parent / "corpus" / "tinyshakespeare.txt"


def embedded_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The shipped corpus, cut at ``max_bytes`` of UTF-8. Needs no network; the same text
    everywhere."""
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    try:
        data = CORPUS_FILE.read_bytes()
    except OSError as e:
        raise DataError(f"the default corpus {CORPUS_FILE} cannot be read ({e.strerror}): "
                        "reinstall the package, or give training data with --data") from None
    # Cut by bytes, then drop a multi-byte character split by the cut.
    return data[:max_bytes].decode("utf-8", errors="ignore")


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
