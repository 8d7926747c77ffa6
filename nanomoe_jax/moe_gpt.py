"""MoeGPT in Flax NNX: attention with q/k norms and a DeepSeek-style MoE feed-forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import MoeGPTConfig

from .decoder import RMSNormDecoder
from .layers import Attention, Options, head_and_loss, rms_norm
from .moe import MoE


class Block(nnx.Module):
    def __init__(self, c: MoeGPTConfig, opts: Options, rngs: nnx.Rngs):
        self.ln1 = rms_norm(c.n_embd, opts, rngs)
        self.attn = Attention(c.n_embd, c.n_head, c.n_head, opts, rngs, bias=c.use_bias,
                              rope_base=c.rope_scaling, qk_norm=True)
        self.ln2 = rms_norm(c.n_embd, opts, rngs)
        self.mlp = MoE(c, opts, rngs)

    def __call__(self, x_BTC, cache=None, pos=None):
        y_BTC, cache = self.attn(self.ln1(x_BTC), cache, pos)
        x_BTC = x_BTC + y_BTC
        y_BTC, metrics = self.mlp(self.ln2(x_BTC))
        return x_BTC + y_BTC, metrics, cache


class MoeGPT(RMSNormDecoder):
    config_class = MoeGPTConfig
    block_class = Block

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        """``(logits,)`` without targets; with them ``(logits, losses)``: the original's
        ``loss``/``ce_loss``/``moe_loss`` plus ``moe``, the per-layer routing metrics
        (``balance_loss`` (L,), ``tokens_per_expert`` (L, E), ``dropped_fraction`` (L,))."""
        h_BTC, moe_L, _ = self.hidden(idx_BT)
        logits_BTV, ce = head_and_loss(self.wte, h_BTC, targets_BT, self.opts, self.ignore_index)
        if targets_BT is None:
            return (logits_BTV,)
        moe_loss = jnp.sum(moe_L["balance_loss"])
        loss = ce + self.config.moe_loss_weight * moe_loss
        return logits_BTV, {"loss": loss, "ce_loss": ce, "moe_loss": moe_loss, "moe": moe_L}
