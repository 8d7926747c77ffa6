"""The PyTorch reference's test cases: small configs of every model and variant, a model with
every tensor random and non-zero, and token batches (test_torch_reference, test_torch_by_hand)."""

import pytest
import torch

import nanomoe_torch
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig

TINY = dict(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=96)
CONFIGS = {
    "gpt": GPTConfig(**TINY),
    "modern-mqa-glu": ModernGPTConfig(**TINY, n_kv_head=1),
    "modern-gqa-gated": ModernGPTConfig(**TINY, n_kv_head=2, use_gate_proj=True),
    "modern-gqa-glu-nobias": ModernGPTConfig(**TINY, n_kv_head=2, use_bias=False),
    "modern-mqa-gated-nobias-double": ModernGPTConfig(**TINY, n_kv_head=1, use_gate_proj=True,
                                                      use_bias=False, double_attn_scale=True),
    "moe": MoeGPTConfig(**TINY),
    "moe-nobias": MoeGPTConfig(**TINY, use_bias=False),
    "moe-m2-sigmoid": MoeGPTConfig(**TINY, m_sub_experts=2, n_activated_experts=3,
                                   route_score_func="sigmoid"),
    "moe-s0-scale2": MoeGPTConfig(**TINY, n_experts=5, n_shared_experts=0, route_scale=2.0),
}
PARAMS = [pytest.param(c, id=name) for name, c in CONFIGS.items()]


def random_model(config, seed=0):
    """The reference model with every tensor random and non-zero (MoE proj_weight too)."""
    model = nanomoe_torch.create_model(config, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def random_tokens(config, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, (B, T), generator=g),
            torch.randint(0, config.vocab_size, (B, T), generator=g))
