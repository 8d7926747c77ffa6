"""Pieces shared by the PyTorch reference models: RMSNorm, interleaved RoPE, attention, MLPs.

Mirrors ``nanomoe_jax/layers.py``. Parameter names are the original's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanomoe.rope import rope_table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope_cache(block_size: int, head_dim: int, base: float) -> torch.Tensor:
    """(block_size, head_dim): sin(t * base^(-2i/hd)) at even columns, cos at odd ones."""
    return torch.from_numpy(rope_table(block_size, head_dim, base).copy())


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, heads, T, hd) by position."""
    T = x.size(-2)
    sin, cos = cache[:T, 0::2].to(x.dtype), cache[:T, 1::2].to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


class Attention(nn.Module):
    """Causal attention with RoPE, n_kv_head <= n_head key/value heads and optional q/k norms.

    Used by ModernGPT (``c_qkv``/``out_proj``, GQA/MQA) and MoeGPT (full heads, RoPE then
    RMSNorm over each head of q and k).
    """

    def __init__(self, n_embd, n_head, n_kv_head, block_size, rope_base, bias, qk_norm=False,
                 double_scale=False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        if qk_norm:  # registered first: the original's key order
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.c_qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.qk_norm = qk_norm
        # The original scales q by 1/sqrt(hd) and SDPA scales again: logits q.k/hd
        # (docs/original.md#moderngpt).
        self.scale = 1.0 / self.head_dim if double_scale else 1.0 / math.sqrt(self.head_dim)
        self.register_buffer("rope_cache", rope_cache(block_size, self.head_dim, rope_base),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, self.rope_cache), apply_rope(k, self.rope_cache)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # query head j reads kv head j // (nh / nkv)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class GluMLP(nn.Module):
    """``c_proj(a * silu(b))`` with ``a, b = c_fc(x).chunk(2)`` (the original's default)."""

    def __init__(self, n_embd, hidden, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 2 * hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x):
        a, b = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(a * F.silu(b))


class GatedMLP(nn.Module):
    """Llama's SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, n_embd, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_linears_and_embeddings(module: nn.Module, std: float = 0.02) -> None:
    """Every nn.Linear weight and nn.Embedding N(0, std), biases zero (as the original)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def check_sequence_length(T: int, block_size: int) -> None:
    if T > block_size:
        raise ValueError(
            f"sequence length {T} is longer than block_size={block_size}; "
            "use shorter sequences or a config with a larger block_size"
        )


def cross_entropy(logits, targets, ignore_index=-100):
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=ignore_index)
