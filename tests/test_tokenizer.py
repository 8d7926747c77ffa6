"""Tokenizers: bytes round trip, unknown names, and the GPT-2 wrapper without tiktoken, offline
and around a stand-in encoding (no download)."""

import sys

import numpy as np
import pytest

from nanomoe.tokenizer import TiktokenGPT2, TokenizerError, get_tokenizer


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "naïve ☃ text\n"
    ids = tok.encode(text)
    assert (tok.name, tok.vocab_size, tok.eot) == ("byte", 256, None)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids[:3]) == "na\ufffd"  # a split character becomes U+FFFD
    assert tok.decode(np.array(ids + [300])) == text  # padded-vocab ids are dropped


def test_unknown_tokenizer_names_the_choices():
    with pytest.raises(TokenizerError, match="byte.*gpt2"):
        get_tokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("missing/tokenizer.json")


def test_gpt2_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(TokenizerError, match="pip install tiktoken"):
        get_tokenizer("gpt2")


def test_gpt2_offline(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="network.*--tokenizer byte"):
        TiktokenGPT2()


def test_gpt2_wrapper(monkeypatch):
    """Our wrapper around tiktoken (whose BPE files need a download): the GPT-2 encoding is
    asked for, documents are encoded with encode_ordinary (no special tokens parsed) and ids
    past the vocabulary (padding rows of the model) are dropped when decoding."""
    import tiktoken

    class FakeEncoding:
        def encode_ordinary(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or FakeEncoding())
    tok = get_tokenizer("gpt2")
    assert asked == ["gpt2"] and tok.name == "gpt2"
    assert (tok.vocab_size, tok.eot) == (50257, 50256)
    assert tok.encode("Hi<|endoftext|>") == [ord(c) for c in "Hi<|endoftext|>"]
    assert tok.decode([72, 105, 50300]) == "Hi"
