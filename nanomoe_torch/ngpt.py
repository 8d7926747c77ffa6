"""nGPT (the original's ``nGPT``, "based on NVIDIA/ngpt"): a residual stream of unit vectors
moved towards each sub-block's normalised output by learned eigen learning rates.

The original's quirks are reproduced (docs/original.md#ngpt): the rotary map uses the two
halves of the sin/cos table as "sin" and "cos" and writes its output in halves; attention keeps
SDPA's 1/sqrt(hd) on unit q, k; the scale vectors are normalised by their largest entry, so only
their shape is learned. ``paper_attn_scale`` / ``standard_rope`` switch to the paper's variants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanomoe.config import nGPTConfig

from .layers import RMSNorm, apply_rope, check_sequence_length, cross_entropy, rope_cache
from .pretrained import PretrainedMixin

ROPE_BASE = 10000.0
ALPHA_TARGET = 0.05  # what eff() pins the largest |residual rate| to
SCALE_FLOOR = 1e-6


def justnorm(x: torch.Tensor) -> torch.Tensor:
    """x / (||x||_2 + 1e-8) over the last axis (eps added to the norm, not under the root)."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + 1e-8)


def eff(p: torch.Tensor, c: float) -> torch.Tensor:
    """``p * c / max|p|`` (the max floored at 1e-6): only the shape and signs of p are learned.
    The original writes the floor as Python's max(tensor, float); clamp has the same values
    and gradients."""
    return p * (c / torch.clamp(p.abs().max(), min=SCALE_FLOOR))


def half_split_rotary(x: torch.Tensor, table_TD: torch.Tensor) -> torch.Tensor:
    """The original's map of x (B, Q, T, D): sin, cos = the first and second halves of the
    table rows (its names: not the sine and cosine of one angle), e, o = the even and odd
    features; returns concat(e*cos - o*sin, o*cos + e*sin). Not a rotation, and pair
    (x[2j], x[2j+1]) lands at (j, D/2 + j) (docs/original.md#ngpt)."""
    d = x.size(-1) // 2
    sin_Td, cos_Td = table_TD[:, :d], table_TD[:, d:]
    e, o = x[..., 0::2], x[..., 1::2]
    return torch.cat([e * cos_Td - o * sin_Td, o * cos_Td + e * sin_Td], dim=-1)


class nGPTBlock(nn.Module):  # noqa: N801 - the original's name
    def __init__(self, config: nGPTConfig):
        super().__init__()
        C, s = config.n_embd, config.base_scale
        self.n_head, self.head_dim = config.n_head, C // config.n_head
        self.config = config
        self.attn_alpha = nn.Parameter(torch.full((C,), ALPHA_TARGET * s))
        self.mlp_alpha = nn.Parameter(torch.full((C,), ALPHA_TARGET * s))
        self.sqk = nn.Parameter(torch.full((C,), s))
        self.suv = nn.Parameter(torch.full((8 * C,), s))
        self.c_attn = nn.Linear(C, 3 * C, bias=False)
        self.attn_out = nn.Linear(C, C, bias=False)
        self.c_mlp = nn.Linear(C, 8 * C, bias=False)  # u (first 4C), then the gate g
        self.mlp_out = nn.Linear(4 * C, C, bias=False)
        self.rms_att = RMSNorm(C)
        self.rms_mlp = RMSNorm(C)
        self.act = nn.SiLU()

    def forward(self, x, table_TD):
        B, T, C = x.shape
        nh, hd = self.n_head, self.head_dim
        q, k, v = self.c_attn(self.rms_att(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
        if self.config.standard_rope:
            q, k = apply_rope(q.float(), table_TD), apply_rope(k.float(), table_TD)
        else:
            q, k = half_split_rotary(q, table_TD), half_split_rotary(k, table_TD)
        s_qk = eff(self.sqk, 1.0)[:hd]  # the first hd entries, shared by every head
        q, k = justnorm(q) * s_qk, justnorm(k) * s_qk
        scale = math.sqrt(hd) if self.config.paper_attn_scale else None  # None: 1/sqrt(hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        y = self.attn_out(o.transpose(1, 2).reshape(B, T, C))

        x_hat = justnorm(x)
        h_att = x_hat + eff(self.attn_alpha, ALPHA_TARGET) * (justnorm(y) - x_hat)  # not renormalised
        uv = self.c_mlp(self.rms_mlp(h_att)) * eff(self.suv, 1.0)
        u, g = uv.split(4 * C, dim=-1)
        y2 = self.mlp_out(u * self.act(g))  # SiLU on the second half
        h_mlp = h_att + eff(self.mlp_alpha, ALPHA_TARGET) * (justnorm(y2) - h_att)
        return justnorm(h_mlp)


class nGPT(PretrainedMixin, nn.Module):  # noqa: N801 - the original's name
    config_class = nGPTConfig

    def __init__(self, config: nGPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([nGPTBlock(config) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: named_parameters() yields wte.weight
        hd = config.n_embd // config.n_head
        self.register_buffer("sinusoidal_cache", rope_cache(config.block_size, hd, ROPE_BASE),
                             persistent=False)
        # the original's init: every Linear and Embedding N(0, base_scale^2), children before
        # parents, so the tied tensor keeps lm_head's (the last) draw
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.base_scale)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        check_sequence_length(T, self.config.block_size)
        x = self.wte(idx)
        table_TD = self.sinusoidal_cache[:T]
        for block in self.blocks:
            x = block(x, table_TD)
        logits = self.lm_head(x)
        loss = None if targets is None else cross_entropy(logits, targets, ignore_index=-1)
        return logits, {"loss": loss}


@torch.no_grad()
def normalize_weights(model: nGPT) -> None:
    """The nGPT paper's projection after an optimizer step (``--ngpt_normalize_weights``):
    every weight vector along the embedding axis to unit norm, i.e. the rows of ``wte`` and
    of the input projections ``c_attn``/``c_mlp``, the columns of the output projections
    ``attn_out``/``mlp_out`` (torch's (out, in) layout)."""
    for name, p in model.named_parameters():
        axis = ngpt_norm_axis(name)
        if axis is not None:
            p.div_(p.norm(p=2, dim=axis, keepdim=True).clamp(min=1e-12))


def ngpt_norm_axis(name: str) -> int | None:
    """The axis of the original's (torch-layout) tensor ``name`` that normalize_weights
    normalises over, None for the tensors it leaves alone (vectors)."""
    if name.endswith(("wte.weight", "lm_head.weight", "c_attn.weight", "c_mlp.weight")):
        return 1
    if name.endswith(("attn_out.weight", "mlp_out.weight")):
        return 0
    return None
