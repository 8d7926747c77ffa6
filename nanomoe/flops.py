"""FLOP estimates for MFU (the PaLM / nanoGPT estimate) and known device peaks."""

from __future__ import annotations

import numpy as np

from .config import GPTConfig, ModelConfig, MoeGPTConfig
from .init import param_specs, tied_names

# bf16 dense tensor-core peaks from the datasheets (FLOP/s)
PEAK_BF16 = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "RTX 4090": 165e12,
    "L4": 121e12,
}


def active_params(config: ModelConfig) -> int:
    """Parameters one token touches: the tied output matrix counted once, learned position
    embeddings excluded, and for the MoE only the S shared + k routed experts."""
    specs = param_specs(config)
    lm_head, _ = tied_names(config)
    n = 0
    for name, spec in specs.items():
        if name == lm_head or name.endswith("wpe.weight"):
            continue
        size = int(np.prod(spec.shape))
        if isinstance(config, MoeGPTConfig) and ".mlp.impl." in name and "gate_linear" not in name:
            size = size * (config.n_shared + config.n_activated_experts) // config.n_total_experts
        n += size
    return n


def flops_per_token(config: ModelConfig, T: int) -> float:
    """6 N_active + 12 L C T: forward + backward matmuls plus attention scores."""
    return 6 * active_params(config) + 12 * config.n_layer * config.n_embd * T


def device_peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16.items():
        if key.lower() in device_name.lower():
            return peak
    return None


__all__ = ["active_params", "flops_per_token", "device_peak_flops", "GPTConfig"]
