"""GPT-2 in Flax NNX: LayerNorm, learned positions, GELU(tanh) MLP, tied head. Axis letters of
names like ``x_BTC``: docs/dimensions.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import GPTConfig

from .layers import (Decoding, Attention, GeluMLP, Options, check_sequence_length, embed, head_and_loss,
                     layer_norm, make_stack, run_stack)


class Block(nnx.Module):
    def __init__(self, c: GPTConfig, opts: Options, rngs: nnx.Rngs):
        proj_std = 0.02 * (2 * c.n_layer) ** -0.5  # residual projections
        self.ln1 = layer_norm(c.n_embd, opts, rngs)
        self.attn = Attention(c.n_embd, c.n_head, c.n_head, opts, rngs, out_std=proj_std)
        self.ln2 = layer_norm(c.n_embd, opts, rngs)
        self.mlp = GeluMLP(c.n_embd, 4 * c.n_embd, opts, rngs, out_std=proj_std)

    def __call__(self, x_BTC, cache=None, pos=None):
        y_BTC, cache = self.attn(self.ln1(x_BTC), cache, pos)
        x_BTC = x_BTC + y_BTC
        return x_BTC + self.mlp(self.ln2(x_BTC)), None, cache


class GPT(Decoding, nnx.Module):
    config_class = GPTConfig
    ignore_index = -100  # torch's default: GPT-2 ignores no real token

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        self.wte = embed(c.vocab_size, c.n_embd, opts, rngs)
        self.wpe = embed(c.block_size, c.n_embd, opts, rngs, rows="positions")
        self.blocks = make_stack(lambda r: Block(c, opts, r), c.n_layer, rngs)
        self.ln_f = layer_norm(c.n_embd, opts, rngs)

    def hidden(self, idx_BT, cache=None, pos=None):
        """Final-norm hidden states (and per-layer aux, updated cache) of tokens at pos.."""
        T = idx_BT.shape[1]
        check_sequence_length(T, self.config.block_size)
        positions_T = jnp.arange(T) if cache is None else pos + jnp.arange(T)
        x_BTC = self.wte(idx_BT) + self.wpe(positions_T)[None]
        x_BTC, aux, cache = run_stack(self.blocks, x_BTC, self.opts, cache, pos)
        return self.ln_f(x_BTC), aux, cache

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        """``(logits, {'loss': loss or None})``, as the original."""
        h_BTC, _, _ = self.hidden(idx_BT)
        logits_BTV, loss = head_and_loss(self.wte, h_BTC, targets_BT, self.opts, self.ignore_index)
        return logits_BTV, {"loss": loss}
