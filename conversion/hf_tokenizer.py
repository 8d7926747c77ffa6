"""The tokenizer files of a Hugging Face export, for every tokenizer this project trains with,
so ``AutoTokenizer.from_pretrained(folder)`` and ``pipeline("text-generation", model=folder)``
work as a transformers user expects (issue 25: byte-level exports had none).

- ``byte`` (the default corpus): a ``tokenizer.json`` built with the ``tokenizers`` library that
  gives token i to byte i, as nanomoe.tokenizer.ByteTokenizer does: a byte-level BPE with the
  256 single bytes as its vocabulary and no merges. Byte-level pre-tokenization shows each byte
  as one printable character (GPT-2's table, rebuilt below), which is what the vocabulary's
  keys are; its decoder turns them back into bytes.
- ``gpt2`` and a ``tokenizer.json`` path: _write_named (GPT-2's vocab.json and
  merges.txt from tiktoken's cache; the run's tokenizer.json copied).

A checkpoint that does not name its tokenizer (a .pt) with the byte vocabulary of exactly 256
gets the byte tokenizer, as the samplers guess; the export says it guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

BYTE_VOCAB = 256
# tiktoken's GPT-2 files are GPT-2's own vocab.json and merges.txt: (url, name in the export)
GPT2_FILES = (("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
               "vocab.json"),
              ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
               "merges.txt"))


def byte_chars() -> list[str]:
    """The printable character byte-level tokenizers show for each byte value: printable
    Latin-1 bytes stand for themselves, the other 68 take code points from 256 on in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json(path: str) -> None:
    """Write a tokenizer.json whose ids are the UTF-8 bytes of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # optional (hf extra)

    vocab = {ch: b for b, ch in enumerate(byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split and no leading space: the text's bytes, one token each, nothing added
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def write_tokenizer(staging: str, tokenizer: str | None, vocab_size: int, block_size: int) -> str:
    """The tokenizer files for an export folder; returns what was written, in words."""
    guessed = tokenizer is None and vocab_size == BYTE_VOCAB
    if guessed:
        tokenizer = "byte"
    if tokenizer != "byte":
        return _write_named(staging, tokenizer, block_size)
    byte_tokenizer_json(os.path.join(staging, "tokenizer.json"))
    with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    return ("the byte tokenizer (tokenizer.json" +
            (", guessed from the vocabulary of 256: the checkpoint does not name it)"
             if guessed else ")"))


def _tiktoken_cache_dir() -> str:
    # where tiktoken keeps downloaded files (its own rule): never fetched here
    return (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "data-gym-cache"))


def _write_named(staging: str, tokenizer: str | None, block_size: int) -> str:
    """Copy the run's tokenizer files, if they are on disk; returns what was done, in words."""
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    if tokenizer == "gpt2":
        cache = _tiktoken_cache_dir()
        found = [(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()), name)
                 for url, name in GPT2_FILES]
        if not all(os.path.isfile(p) for p, _ in found):
            return ("no tokenizer files: tiktoken's GPT-2 files are not cached here (use "
                    "transformers' GPT2TokenizerFast, the same BPE)")
        for path, name in found:
            shutil.copyfile(path, os.path.join(staging, name))
        extra = {"tokenizer_class": "GPT2Tokenizer", **special}
    elif tokenizer and tokenizer.endswith(".json") and os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(staging, "tokenizer.json"))
        with open(tokenizer, encoding="utf-8") as f:
            added = {t.get("content") for t in json.load(f).get("added_tokens") or []}
        extra = {"tokenizer_class": "PreTrainedTokenizerFast",
                 **{k: v for k, v in special.items() if v in added}}
    else:
        return f"no tokenizer files (the run's tokenizer: {tokenizer or 'not recorded'})"
    with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
        json.dump({**extra, "model_max_length": block_size}, f, indent=2)
    return "the tokenizer files"
