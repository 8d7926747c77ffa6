"""ModernGPT in Flax NNX: RMSNorm, interleaved RoPE, GQA/MQA, a*silu(b) or gated MLP."""

from __future__ import annotations

import jax
from flax import nnx

from nanomoe.config import ModernGPTConfig

from .layers import (Attention, GatedMLP, GluMLP, Options, check_sequence_length, cross_entropy,
                     make_stack, normal, rms_norm, run_stack)


class Block(nnx.Module):
    def __init__(self, c: ModernGPTConfig, opts: Options, rngs: nnx.Rngs):
        self.ln1 = rms_norm(c.n_embd, opts, rngs)
        self.attn = Attention(c.n_embd, c.n_head, c.n_kv_head, opts, rngs, bias=c.use_bias,
                              rope_base=c.rope_scaling, double_scale=c.double_attn_scale)
        self.ln2 = rms_norm(c.n_embd, opts, rngs)
        mlp = GatedMLP if c.use_gate_proj else GluMLP
        self.mlp = mlp(c.n_embd, c.ffn_factor * c.n_embd, opts, rngs, bias=c.use_bias)

    def __call__(self, x_BTC):
        x_BTC = x_BTC + self.attn(self.ln1(x_BTC))
        return x_BTC + self.mlp(self.ln2(x_BTC)), None


class ModernGPT(nnx.Module):
    config_class = ModernGPTConfig
    ignore_index = -1

    def __init__(self, config: ModernGPTConfig, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        self.wte = nnx.Embed(c.vocab_size, c.n_embd, embedding_init=normal(0.02),
                             dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.blocks = make_stack(lambda r: Block(c, opts, r), c.n_layer, rngs)
        self.ln_f = rms_norm(c.n_embd, opts, rngs)

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        B, T = idx_BT.shape
        check_sequence_length(T, self.config.block_size)
        x_BTC, _ = run_stack(self.blocks, self.wte(idx_BT), self.opts)
        h_BTC = self.ln_f(x_BTC)
        logits_BTV = self.wte.attend(h_BTC)
        if targets_BT is None:
            return logits_BTV, {"loss": None}
        loss = cross_entropy(h_BTC.reshape(B * T, -1), self.wte.attend, targets_BT.reshape(-1),
                             self.ignore_index, self.opts.loss_chunk_tokens)
        return logits_BTV, {"loss": loss}
