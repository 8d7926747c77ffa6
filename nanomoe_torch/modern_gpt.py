"""ModernGPT: RMSNorm, interleaved RoPE, grouped-/multi-query attention, a*silu(b) MLP."""

from __future__ import annotations

from torch import nn

from nanomoe.config import ModernGPTConfig

from .layers import (Attention, GatedMLP, GluMLP, RMSNorm, check_sequence_length, cross_entropy,
                     init_linears_and_embeddings)
from .pretrained import PretrainedMixin


class Block(nn.Module):
    def __init__(self, c: ModernGPTConfig):
        super().__init__()
        self.ln1 = RMSNorm(c.n_embd)
        self.attn = Attention(c.n_embd, c.n_head, c.n_kv_head, c.block_size, c.rope_scaling,
                              c.use_bias, double_scale=c.double_attn_scale)
        self.ln2 = RMSNorm(c.n_embd)
        mlp = GatedMLP if c.use_gate_proj else GluMLP
        self.mlp = mlp(c.n_embd, c.ffn_factor * c.n_embd, c.use_bias)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ModernGPT(PretrainedMixin, nn.Module):
    config_class = ModernGPTConfig

    def __init__(self, config: ModernGPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        init_linears_and_embeddings(self)

    def forward(self, idx, targets=None):
        check_sequence_length(idx.size(1), self.config.block_size)
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else cross_entropy(logits, targets, ignore_index=-1)
        return logits, {"loss": loss}
