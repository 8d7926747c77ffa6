"""Tokenizers: UTF-8 bytes (no download), GPT-2 BPE (tiktoken) and Hugging Face tokenizer.json.

All three share one small interface: ``name`` (what checkpoints store; ``get_tokenizer(name)``
rebuilds the tokenizer), ``vocab_size``, ``eot`` (the end-of-text id put between documents, or
None), ``encode(text) -> list[int]`` (no special tokens are parsed from the text) and
``decode(ids) -> str`` (invalid UTF-8 becomes U+FFFD). ``tiktoken`` and ``tokenizers`` are
optional: they are imported only when their tokenizer is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import NanoMoeError
from .files import check_regular_file

TOKENIZERS = ("byte", "gpt2", "PATH/tokenizer.json")


class TokenizerError(NanoMoeError, ValueError):
    """A tokenizer that cannot be built or loaded (says how to get it)."""


class ByteTokenizer:
    """One token per UTF-8 byte: vocab 256 (a multiple of 64, so no padding), works offline.

    ``eot`` is None: there is no id left for a separator, so documents are simply concatenated.
    """

    name = "byte"
    vocab_size = 256
    eot = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        # The fast path for whole corpora: no Python list of millions of ints.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        # Ids >= 256 can only come from a model's padded vocab rows: drop them.
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class TiktokenGPT2:
    """GPT-2 BPE as the original uses it (vocab 50257, ``<|endoftext|>`` = 50256)."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        try:
            import tiktoken
        except ImportError as e:
            raise TokenizerError(
                "the gpt2 tokenizer needs tiktoken, which is not installed: "
                "pip install tiktoken, or use --tokenizer byte"
            ) from e
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: requests/urllib errors, a broken cache, ...
            raise TokenizerError(
                f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}: "
                f"{str(e)[:120]}): run once with network access so tiktoken caches them "
                "(or point TIKTOKEN_CACHE_DIR at a folder that has them), or use --tokenizer byte"
            ) from e

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" inside a document is text, as in the original's prep.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([i for i in (int(t) for t in ids) if 0 <= i < self.vocab_size])


# Ids looked up (in this order) to find a tokenizer.json's end-of-text token.
_EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer file {path} does not exist: give a tokenizer.json, "
                                 "or use --tokenizer byte or gpt2")
        check_regular_file(path, "tokenizer.json file", TokenizerError)  # a FIFO would block
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise TokenizerError(
                f"reading {path} needs the tokenizers package: pip install tokenizers"
            ) from e
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({e})") from e
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size == 0:  # every text would encode to nothing, or fail in encode()
            raise TokenizerError(f"{path} has an empty vocabulary, so it cannot encode any "
                                 "text: give a trained tokenizer.json, or use --tokenizer byte "
                                 "or gpt2")
        ids = (self._tok.token_to_id(t) for t in _EOT_CANDIDATES)
        self.eot = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 - e.g. a model whose unknown token is missing
            detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise TokenizerError(f"{self.name} cannot encode the text ({detail}); fix the "
                                 "tokenizer.json or use another tokenizer") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                                skip_special_tokens=False)


Tokenizer = ByteTokenizer | TiktokenGPT2 | JsonTokenizer


def get_tokenizer(name: str) -> Tokenizer:
    """``"byte"`` | ``"gpt2"`` | a path to a tokenizer.json (a tokenizer's ``.name`` works too)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenGPT2()
    if name.endswith(".json") or Path(name).exists():
        return JsonTokenizer(name)
    raise TokenizerError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode`` as the smallest unsigned array that holds its vocab."""
    if hasattr(tokenizer, "encode_array"):
        return tokenizer.encode_array(text)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.asarray(tokenizer.encode(text), dtype=dtype)
