"""MoeGPT: ModernGPT's attention with q/k norms, and a DeepSeek-style MoE feed-forward."""

from __future__ import annotations

import torch
from torch import nn

from nanomoe.config import MoeGPTConfig

from .layers import (Attention, RMSNorm, check_sequence_length, cross_entropy,
                     init_linears_and_embeddings)
from .moe import MoE
from .pretrained import PretrainedMixin


class Block(nn.Module):
    def __init__(self, c: MoeGPTConfig):
        super().__init__()
        self.ln1 = RMSNorm(c.n_embd)
        self.attn = Attention(c.n_embd, c.n_head, c.n_head, c.block_size, c.rope_scaling,
                              c.use_bias, qk_norm=True)
        self.ln2 = RMSNorm(c.n_embd)
        self.mlp = MoE(c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        y, balance_loss = self.mlp(self.ln2(x))
        return x + y, balance_loss


class MoeGPT(PretrainedMixin, nn.Module):
    config_class = MoeGPTConfig

    def __init__(self, config: MoeGPTConfig):
        super().__init__()
        self.config = config
        torch.manual_seed(config.seed)  # as the original's constructor does
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        # The original re-initialises every nn.Linear after building the blocks; the expert
        # tensors are plain Parameters, so proj_weight keeps its zeros.
        init_linears_and_embeddings(self)

    def forward(self, idx, targets=None):
        check_sequence_length(idx.size(1), self.config.block_size)
        x = self.wte(idx)
        moe_loss = 0.0
        for block in self.blocks:
            x, balance_loss = block(x)
            moe_loss = moe_loss + balance_loss
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return (logits,)
        ce = cross_entropy(logits, targets, ignore_index=-1)
        loss = ce + self.config.moe_loss_weight * moe_loss
        return logits, {"loss": loss, "ce_loss": ce, "moe_loss": moe_loss}
