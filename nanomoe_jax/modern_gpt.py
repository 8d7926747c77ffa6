"""ModernGPT in Flax NNX: RMSNorm, interleaved RoPE, GQA/MQA, a*silu(b) or gated MLP. Axis
letters: docs/dimensions.md; the original's behaviours kept: docs/original.md#moderngpt."""

from __future__ import annotations

import jax
from flax import nnx

from nanomoe.config import ModernGPTConfig

from .decoder import RMSNormDecoder
from .layers import Attention, GatedMLP, GluMLP, Options, head_and_loss, rms_norm


class Block(nnx.Module):
    def __init__(self, c: ModernGPTConfig, opts: Options, rngs: nnx.Rngs):
        self.ln1 = rms_norm(c.n_embd, opts, rngs)
        self.attn = Attention(c.n_embd, c.n_head, c.n_kv_head, opts, rngs, bias=c.use_bias,
                              rope_base=c.rope_scaling, double_scale=c.double_attn_scale)
        self.ln2 = rms_norm(c.n_embd, opts, rngs)
        mlp = GatedMLP if c.use_gate_proj else GluMLP
        self.mlp = mlp(c.n_embd, c.ffn_factor * c.n_embd, opts, rngs, bias=c.use_bias)

    def __call__(self, x_BTC, cache=None, pos=None):
        y_BTC, cache = self.attn(self.ln1(x_BTC), cache, pos)
        x_BTC = x_BTC + y_BTC
        return x_BTC + self.mlp(self.ln2(x_BTC)), None, cache


class ModernGPT(RMSNormDecoder):
    config_class = ModernGPTConfig
    block_class = Block

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        """``(logits, {'loss': loss or None})``, as the original."""
        h_BTC, _, _ = self.hidden(idx_BT)
        logits_BTV, loss = head_and_loss(self.wte, h_BTC, targets_BT, self.opts, self.ignore_index)
        return logits_BTV, {"loss": loss}
