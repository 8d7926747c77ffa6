"""GPT-2 in Flax NNX: LayerNorm, learned positions, GELU(tanh) MLP, tied head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import GPTConfig

from .layers import (Attention, GeluMLP, Options, check_sequence_length, cross_entropy,
                     layer_norm, make_stack, normal, run_stack)


class Block(nnx.Module):
    def __init__(self, c: GPTConfig, opts: Options, rngs: nnx.Rngs):
        proj_std = 0.02 * (2 * c.n_layer) ** -0.5  # residual projections
        self.ln1 = layer_norm(c.n_embd, opts, rngs)
        self.attn = Attention(c.n_embd, c.n_head, c.n_head, opts, rngs, out_std=proj_std)
        self.ln2 = layer_norm(c.n_embd, opts, rngs)
        self.mlp = GeluMLP(c.n_embd, 4 * c.n_embd, opts, rngs, out_std=proj_std)

    def __call__(self, x_BTC):
        x_BTC = x_BTC + self.attn(self.ln1(x_BTC))
        return x_BTC + self.mlp(self.ln2(x_BTC)), None


class GPT(nnx.Module):
    config_class = GPTConfig
    ignore_index = -100  # torch's default: GPT-2 ignores no real token

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        embed = dict(embedding_init=normal(0.02), dtype=opts.dtype, param_dtype=opts.param_dtype,
                     rngs=rngs)
        self.wte = nnx.Embed(c.vocab_size, c.n_embd, **embed)
        self.wpe = nnx.Embed(c.block_size, c.n_embd, **embed)
        self.blocks = make_stack(lambda r: Block(c, opts, r), c.n_layer, rngs)
        self.ln_f = layer_norm(c.n_embd, opts, rngs)

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        B, T = idx_BT.shape
        check_sequence_length(T, self.config.block_size)
        x_BTC = self.wte(idx_BT) + self.wpe(jnp.arange(T))[None]
        x_BTC, _ = run_stack(self.blocks, x_BTC, self.opts)
        h_BTC = self.ln_f(x_BTC)
        logits_BTV = self.wte.attend(h_BTC)  # tied head; dropped by XLA when only the loss is used
        if targets_BT is None:
            return logits_BTV, {"loss": None}
        loss = cross_entropy(h_BTC.reshape(B * T, -1), self.wte.attend, targets_BT.reshape(-1),
                             self.ignore_index, self.opts.loss_chunk_tokens)
        return logits_BTV, {"loss": loss}
