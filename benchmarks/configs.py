"""What the benchmark runs: size presets, the three models at the original's defaults, and
the MoE sweep points (fixed active compute) with their dense ceiling."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nanomoe.config import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.init import param_specs, tied_names

FRAMEWORKS = ("jax", "torch", "torch-compile")
BACKENDS = ("dense", "capacity", "ragged")
MODELS = ("gpt", "moderngpt", "moegpt", "ngpt")
RESULT_TAG = "@@BENCH_RESULT@@"  # marks the result line of an --isolate child process
LR = 1e-4  # any small constant: the schedule does not change the cost of a step

# --fast-compile (CPU smoke tests): no LLVM optimisation and the older loop-fusion emitters,
# compiles ~4x faster, steps slower. HLO passes still run, so the HLO check is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}



@dataclasses.dataclass(frozen=True)
class Preset:
    B: int
    T: int
    steps: int
    warmup: int
    experts: tuple[int, ...]
    shape: dict  # overrides of every model's size fields; {} = the original's sizes
    matmul_n: int  # side of the square bf16 matmul that measures the peak
    models: tuple[str, ...] = MODELS  # timed when --models is not given
    rounds: int = 1  # > 1: cells built once and timed in turn (benchmarks/interleave.py)


PRESETS = {
    "original": Preset(B=16, T=1024, steps=20, warmup=3, experts=(4, 8, 16, 32, 64), shape={},
                       matmul_n=8192),
    "tiny": Preset(B=2, T=64, steps=5, warmup=2, experts=(4, 8, 16),
                   shape=dict(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=256),
                   matmul_n=512),
    # What a CPU user runs: nanoGPT's Shakespeare quick start (--device=cpu --block_size=64
    # --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128) on bytes, and train.py's own CPU
    # preset (nanomoe/cli.py CPU_PRESET: MoeGPT 4x128, B=8, T=256). No sweep; interleaved.
    "cpu-nanogpt": Preset(B=12, T=64, steps=10, warmup=3, experts=(), matmul_n=512,
                          shape=dict(n_layer=4, n_embd=128, n_head=4, block_size=64,
                                     vocab_size=256), models=("gpt",), rounds=8),
    "cpu-default": Preset(B=8, T=256, steps=4, warmup=2, experts=(), matmul_n=512,
                          shape=dict(n_layer=4, n_embd=128, n_head=4, block_size=256,
                                     vocab_size=256), models=("moegpt",), rounds=8),
}


def model_configs(preset: Preset, overrides: dict | None = None) -> dict[str, Any]:
    """The three models at the original's training defaults (vocab padded to 50304, as its
    train.py builds them), or at the preset's tiny shape; ``overrides`` (``--set``) last."""
    s = {**preset.shape, **(overrides or {})}
    vocab = s.get("vocab_size", 50304)
    return {
        "gpt": GPTConfig(**{**s, "vocab_size": vocab}),
        "moderngpt": ModernGPTConfig(**{**s, "vocab_size": vocab}, n_kv_head=1),
        "moegpt": MoeGPTConfig(**s),
        "ngpt": nGPTConfig(**s),  # the original's main.py keeps nGPT's vocab at 50257
    }


def total_params(config) -> int:
    """Parameters stored (the tied output matrix once)."""
    lm_head, _ = tied_names(config)
    return int(sum(np.prod(s.shape) for n, s in param_specs(config).items() if n != lm_head))

