"""Hugging Face exports carry a tokenizer transformers loads, for every tokenizer the project
trains with (byte, gpt2, a tokenizer.json), so pipeline("text-generation", model=<export>)
runs as an HF user expects (issue 25). Every export goes through `to_hf` from a JAX checkpoint
naming its tokenizer, as a finished run's export does."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import jax.numpy as jnp
import pytest
import torch

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="nanomoe-hf-modules-"))

from helpers import jax_twin, random_torch_model  # noqa: E402

import conversion  # noqa: E402
from conversion.hf_tokenizer import byte_chars  # noqa: E402
from conversion.hf_tokenizer import GPT2_FILES  # noqa: E402
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig  # noqa: E402
from nanomoe.tokenizer import get_tokenizer  # noqa: E402
from nanomoe_jax.checkpoint import save_model  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SIZE = dict(n_layer=1, n_embd=32, n_head=2, block_size=64)
MODELS = {"gpt": GPTConfig, "moderngpt": ModernGPTConfig, "moegpt": MoeGPTConfig,
          "ngpt": nGPTConfig}
REMOTE = ("moegpt", "ngpt")  # exported with their own modeling code
PROMPT = "def f(x):\n    return 'é' "
EOT = "<|endoftext|>"


def fake_gpt2_cache(folder) -> int:
    """tiktoken's cache holding GPT-2-format vocab.json / merges.txt, a tiny BPE (no network
    here for the real 50,257 entries; the format and the loading path are the same)."""
    vocab = {ch: i for i, ch in enumerate(byte_chars())}
    merges = ["d e", "de f", "r e"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab[EOT] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    texts = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n" + "\n".join(merges)}
    for url, name in GPT2_FILES:  # tiktoken names a cached file by its URL's sha1
        with open(os.path.join(folder, hashlib.sha1(url.encode()).hexdigest()), "w") as f:
            f.write(texts[name])
    return len(vocab)


def word_level_json(path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [EOT, "[UNK]", "def", "f", "(", "x", "):", "return", "'", "é"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOT])
    tok.save(str(path))
    return len(words)


def export(tmp_path, model, tokenizer, vocab):
    config = MODELS[model](**SIZE, vocab_size=vocab)
    tm = random_torch_model(config, seed=3).eval()
    ckpt = str(tmp_path / "ckpt")
    save_model(jax_twin(tm, dtype=jnp.float32), ckpt, 5, {"tokenizer": tokenizer})
    return conversion.to_hf(ckpt, str(tmp_path / "hf"), log=lambda *_: None)


CASES = [(m, "byte") for m in MODELS] + [(m, t) for m in ("gpt", "moegpt")
                                         for t in ("gpt2", "tokenizer.json")]


@pytest.mark.parametrize("model,tokenizer", CASES)
def test_pipeline_runs_on_the_export(model, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if tokenizer == "gpt2":
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
        name, vocab = "gpt2", fake_gpt2_cache(tmp_path / "tiktoken")
    elif tokenizer == "tokenizer.json":
        name = str(tmp_path / "tokenizer.json")
        vocab = word_level_json(name)
    else:
        name, vocab = "byte", 256
    folder = export(tmp_path, model, name, -(-vocab // 64) * 64)
    remote = model in REMOTE
    generate = pipeline("text-generation", model=folder, trust_remote_code=remote)
    text = generate(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert isinstance(text, str) and text.startswith(PROMPT)

    # the folder's tokenizer is the run's: same ids, and the pipeline's text is greedy decoding
    # (remote code: AutoTokenizer reads config.json, whose auto_map would ask first)
    hf_tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote, local_files_only=True)
    ids = hf_tok(PROMPT)["input_ids"]
    if tokenizer != "gpt2":  # (the fake GPT-2 files are not tiktoken's real BPE)
        assert ids == get_tokenizer(name).encode(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote,
                                              local_files_only=True).eval()
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    if tokenizer == "tokenizer.json":  # words joined by spaces: the pipeline keeps the prompt
        assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    else:  # byte-level: decoding the greedy ids gives exactly the pipeline's text
        assert text == hf_tok.decode(out[0].tolist())
    if tokenizer == "byte":
        assert ids == list(PROMPT.encode()) and hf_tok.decode(ids) == PROMPT


def test_a_pt_without_a_tokenizer_name_gets_bytes_at_vocab_256(tmp_path):
    """model_final.pt does not name its tokenizer: 256 is the byte vocabulary (said so)."""
    from transformers import AutoTokenizer

    tm = random_torch_model(GPTConfig(**SIZE, vocab_size=256))
    path = tmp_path / "model_final.pt"
    torch.save({"model": tm.state_dict(), "config": {**SIZE, "vocab_size": 256}, "step": 1}, path)
    said = []
    folder = conversion.to_hf(str(path), str(tmp_path / "hf"), log=said.append)
    assert "guessed from the vocabulary of 256" in said[-1]
    assert AutoTokenizer.from_pretrained(folder)("hé")["input_ids"] == list("hé".encode())
