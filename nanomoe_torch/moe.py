"""The original's MoE feed-forward (``moe_impl='parallel'``): every expert on every token.

Mirrors ``nanomoe_jax/moe.py``, whose ``dense`` dispatch is this math and whose sparse
dispatches must agree with it. The ``# 1`` .. ``# 7`` comments number the router's steps as
docs/original.md lists them (MoeGPT, Router), each linked to the original's line.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanomoe.config import MoeGPTConfig


class Routing(NamedTuple):
    gates: torch.Tensor       # (N, E) fp32, renormalised over the S + k experts in use, else 0
    usage: torch.Tensor       # (E,) tokens per expert (no gradient)
    score_sum: torch.Tensor   # (E,) router probabilities summed over tokens
    balance_loss: torch.Tensor


def route(logits: torch.Tensor, c: MoeGPTConfig) -> Routing:
    """Router math on fp32 logits (N, E): shared experts always on, top-k among the rest."""
    S, k, E = c.n_shared, c.n_activated_experts, c.n_total_experts
    N = logits.size(0)
    scores = logits.softmax(-1) if c.route_score_func == "softmax" else logits.sigmoid()  # 1
    score_sum = scores.sum(0)                                                               # 2
    shared, routed = scores[:, :S], scores[:, S:]                                           # 3
    top_vals, top_idx = routed.topk(k, dim=-1)
    kept = torch.zeros_like(routed).scatter(-1, top_idx, top_vals)
    combined = torch.cat([shared, kept], dim=-1) * c.route_scale
    gates = combined / (combined.sum(-1, keepdim=True) + 1e-8)                              # 4
    usage = (combined > 0).sum(0).detach()                                                  # 5
    f = E / ((S + k) * N) * usage                                                           # 7
    P = score_sum / N
    return Routing(gates, usage, score_sum, (f * P).sum())


class ParallelMoE(nn.Module):
    """Stacked experts in the original's layouts; ``relu(x W1^T + b1)^2 W2^T + b2``."""

    def __init__(self, c: MoeGPTConfig):
        super().__init__()
        self.config = c
        E, H, C = c.n_total_experts, c.expert_hidden, c.n_embd
        self.gate_linear = nn.Linear(C, E, bias=c.use_bias)
        self.fc_weight = nn.Parameter(torch.empty(E, H, C).normal_(std=0.02))
        self.fc_bias = nn.Parameter(torch.zeros(E, H))
        self.proj_weight = nn.Parameter(torch.zeros(E, C, H))
        self.proj_bias = nn.Parameter(torch.zeros(E, C))

    def router(self, x: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):  # router in fp32
            logits = F.linear(x.float(), self.gate_linear.weight.float(),
                              None if self.gate_linear.bias is None else self.gate_linear.bias.float())
        return route(logits, self.config)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.router(x)
        h = F.relu(torch.einsum("nc,ehc->neh", x, self.fc_weight) + self.fc_bias) ** 2     # 6
        y = torch.einsum("neh,ech->nec", h, self.proj_weight) + self.proj_bias
        out = torch.einsum("ne,nec->nc", r.gates, y.float()).to(x.dtype)
        return out.reshape(shape), r.balance_loss


class MoE(nn.Module):
    """Holds the implementation as ``impl`` so the original's keys (``mlp.impl.*``) match."""

    def __init__(self, c: MoeGPTConfig):
        super().__init__()
        self.impl = ParallelMoE(c)

    def forward(self, x):
        return self.impl(x)
