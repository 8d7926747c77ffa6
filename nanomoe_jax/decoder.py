"""The shell ModernGPT and MoeGPT share: token embedding, a scanned stack of pre-norm blocks, a
final RMSNorm, and KV-cache decoding on top (``layers.Decoding``). Each model's file keeps its
block and its ``__call__`` (what the loss is made of)."""

from __future__ import annotations

from flax import nnx

from .layers import Decoding, Options, check_sequence_length, embed, make_stack, rms_norm, run_stack


class RMSNormDecoder(Decoding, nnx.Module):
    block_class: type  # Block(config, opts, rngs) -> (x, per-layer aux, cache)
    ignore_index = -1

    def __init__(self, config, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        self.wte = embed(c.vocab_size, c.n_embd, opts, rngs)
        self.blocks = make_stack(lambda r: self.block_class(c, opts, r), c.n_layer, rngs)
        self.ln_f = rms_norm(c.n_embd, opts, rngs)

    def hidden(self, idx_BT, cache=None, pos=None):
        """Final-norm hidden states (and per-layer aux, updated cache) of tokens at pos.."""
        check_sequence_length(idx_BT.shape[1], self.config.block_size)
        x_BTC, aux_L, cache = run_stack(self.blocks, self.wte(idx_BT), self.opts, cache, pos)
        return self.ln_f(x_BTC), aux_L, cache
