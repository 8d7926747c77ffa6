"""Small builders shared by the tests: tiny configs, random weights, both frameworks, tiny
training runs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from flax import nnx

import conversion
import nanomoe_jax
import nanomoe_torch
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig

TINY = dict(n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=96)

GPT_CONFIGS = {"gpt": GPTConfig(**TINY)}
MODERN_CONFIGS = {
    "mqa-glu": ModernGPTConfig(**TINY, n_kv_head=1),
    "gqa-gated": ModernGPTConfig(**TINY, n_kv_head=2, use_gate_proj=True),
    "mha-nobias-double": ModernGPTConfig(**TINY, n_kv_head=4, use_bias=False,
                                         double_attn_scale=True),
    # a RoPE base other than the default, so that a model ignoring rope_scaling fails
    "gqa-glu-double-ffn3": ModernGPTConfig(**TINY, n_kv_head=2, ffn_factor=3,
                                           double_attn_scale=True, rope_scaling=500.0),
}
MOE_CONFIGS = {
    "default": MoeGPTConfig(**TINY),
    "sigmoid-m2": MoeGPTConfig(**TINY, route_score_func="sigmoid", m_sub_experts=2,
                               n_activated_experts=3),
    "s0-scale2-dim48": MoeGPTConfig(**TINY, n_experts=5, n_shared_experts=0, n_activated_experts=2,
                                    expert_dim=48, route_scale=2.0, rope_scaling=500.0),
    "s2-nobias": MoeGPTConfig(**TINY, n_experts=6, n_shared_experts=2, n_activated_experts=2,
                              use_bias=False),
}
# the original's quirks (seed RoPE map, 1/sqrt(hd) scale), and the paper's two fixes
NGPT_CONFIGS = {
    "ngpt": nGPTConfig(**TINY),
    "ngpt-paper-std-rope": nGPTConfig(**TINY, paper_attn_scale=True, standard_rope=True),
}
ALL_CONFIGS = {**GPT_CONFIGS, **MODERN_CONFIGS, **{f"moe-{k}": v for k, v in MOE_CONFIGS.items()},
               **NGPT_CONFIGS}


def no_drop(config):
    """A MoE config whose capacity can never overflow (capacity_factor >= routed / k)."""
    import dataclasses

    if not isinstance(config, MoeGPTConfig):
        return config
    return dataclasses.replace(config, capacity_factor=config.n_routed_experts
                               / config.n_activated_experts)


def random_torch_model(config, seed: int = 0) -> torch.nn.Module:
    """The reference model with every tensor random and non-zero (MoE proj_weight too)."""
    torch.manual_seed(seed)
    model = nanomoe_torch.create_model(config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def jax_twin(torch_model, **options):
    """A Flax model of the same config holding the torch model's weights."""
    config = torch_model.config
    model = nanomoe_jax.model_class(config)(config, rngs=nnx.Rngs(0), **options)
    return conversion.load_torch_weights(model, torch_model.state_dict())


def tokens(config, B=2, T=16, seed=0, ignore_some=False):
    g = np.random.default_rng(seed)
    idx = g.integers(0, config.vocab_size, (B, T))
    tgt = g.integers(0, config.vocab_size, (B, T))
    if ignore_some:
        tgt[0, :3] = -1
    return idx, tgt


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (b the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@contextlib.contextmanager
def fail_if_blocked(seconds: int):
    """A read blocked on a FIFO fails the test (SIGALRM) instead of hanging the suite."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s (a FIFO was opened?)")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- tiny training runs through train.py's entry point (reliability and run-safety tests) ---

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def corpus_fixture(text: str):
    """A module-scoped fixture: the path of a corpus file holding ``text`` (each module that
    trains tiny runs binds one as ``text_file``)."""
    @pytest.fixture(scope="module")
    def text_file(tmp_path_factory):
        path = tmp_path_factory.mktemp("data") / "corpus.txt"
        path.write_text(text)
        return str(path)
    return text_file


text_file = corpus_fixture(TEXT)


def tiny(framework, text_file, log_dir, *extra, steps=24):
    return ["--framework", framework, "--model", "moegpt", "--n_layer", "1", "--n_embd", "32",
            "--n_head", "2", "--block_size", "32", "--data", text_file, "--log_dir", str(log_dir),
            "--B", "2", "--T", "16", "--total_batch_size", "64", "--max_steps", str(steps),
            "--warmup_steps", "2", "--dtype", "float32", "--eval_interval", "8",
            "--eval_steps", "1", "--ckpt_interval", "3", "--sample_tokens", "2", *extra]


def train_cmd(args):
    return [sys.executable, os.path.join(ROOT, "train.py"), *args]


def step_losses(log_dir):
    records = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def complete_checkpoints(framework, log_dir):
    if not os.path.isdir(log_dir):
        return []
    if framework == "jax":
        folder = os.path.join(log_dir, "checkpoints")
        return [n for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return [n for n in os.listdir(log_dir) if n.startswith("model_0") and n.endswith(".pt")]


def _backend(framework):
    if framework == "jax":
        from nanomoe_train.jax_backend import JaxBackend

        return JaxBackend()
    from nanomoe_train.torch_backend import TorchBackend

    return TorchBackend()


def snapshot(folder):
    """Every file under folder with its bytes' hash: 'nothing overwritten' is equality."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def one_sentence(err: str, *words: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def checkpoint_steps(framework, log) -> list[int]:
    names = complete_checkpoints(framework, log)  # "3" (JAX) or "model_000003.pt" (torch)
    return sorted(int(n.removeprefix("model_").removesuffix(".pt")) for n in names)


def run(framework, argv, capsys):
    from nanomoe.train_loop import main

    code = main(argv, lambda: _backend(framework))
    return code, capsys.readouterr().err


# --- models exported with transformers remote code (the test_hf_remote* files) ---

# default and sigmoid routing with fine-grained (m=2) experts; block 64 holds 8 + 50 tokens
HF_GEN = {k: dataclasses.replace(MOE_CONFIGS[k], block_size=64, moe_dispatch="dense")
          for k in ("default", "sigmoid-m2")}
# nGPT: the original's quirks, and the paper's attention scale with the interleaved RoPE
HF_NGPT = nGPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=64, vocab_size=96)
HF_NGPT_CONFIGS = {"ngpt": HF_NGPT, "ngpt-paper-std-rope": dataclasses.replace(
    HF_NGPT, paper_attn_scale=True, standard_rope=True)}
HF_GEN.update(HF_NGPT_CONFIGS)
HF_PROMPT = [5, 17, 3, 44, 2, 9, 61, 30]


def random_model(config, seed=0, scale=0.5):
    """Weights far enough from the init that greedy text varies (at 0.05 it repeats a token)."""
    torch.manual_seed(seed)
    model = nanomoe_torch.create_model(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def export_remote(model, folder, meta=None):
    from conversion.remote_export import write_remote_folder
    from nanomoe.pt_source import Source

    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_remote_folder(str(folder), Source(model.config, arrays, 7, meta or {}), log=None)
    return str(folder)


def load_remote(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                local_files_only=True).eval()


# the integer fields of each config (the config tests: each must be an int > 0)
INT_FIELDS = {
    GPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"],
    ModernGPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                      "ffn_factor"],
    MoeGPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_experts",
                   "m_sub_experts", "n_activated_experts", "ffn_factor"],
}
