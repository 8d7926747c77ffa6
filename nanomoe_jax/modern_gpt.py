"""ModernGPT in Flax NNX: RMSNorm, interleaved RoPE, GQA/MQA, a*silu(b) or gated MLP. Axis
letters: docs/dimensions.md; the original's behaviours kept: docs/original.md#moderngpt."""

from __future__ import annotations

import jax
from flax import nnx

from nanomoe.config import ModernGPTConfig

from .layers import (Decoding, Attention, GatedMLP, GluMLP, Options, check_sequence_length, embed,
                     head_and_loss, make_stack, rms_norm, run_stack)


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


class ModernGPT(Decoding, nnx.Module):
    config_class = ModernGPTConfig
    ignore_index = -1

    def __init__(self, config: ModernGPTConfig, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        self.wte = embed(c.vocab_size, c.n_embd, opts, rngs)
        self.blocks = make_stack(lambda r: Block(c, opts, r), c.n_layer, rngs)
        self.ln_f = rms_norm(c.n_embd, opts, rngs)

    def hidden(self, idx_BT, cache=None, pos=None):
        """Final-norm hidden states (and per-layer aux, updated cache) of tokens at pos.."""
        check_sequence_length(idx_BT.shape[1], self.config.block_size)
        x_BTC, aux, cache = run_stack(self.blocks, self.wte(idx_BT), self.opts, cache, pos)
        return self.ln_f(x_BTC), aux, cache

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        """``(logits, {'loss': loss or None})``, as the original."""
        h_BTC, _, _ = self.hidden(idx_BT)
        logits_BTV, loss = head_and_loss(self.wte, h_BTC, targets_BT, self.opts, self.ignore_index)
        return logits_BTV, {"loss": loss}
