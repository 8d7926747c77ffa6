"""nGPT in Flax NNX: the original's nGPT (see ``nanomoe_torch/ngpt.py``), quirks included.

Mixed precision as under the original's autocast: the four matmuls and attention run in
``dtype``; RMSNorms, the L2 normalisations, the rotary map, the scale vectors and the residual
interpolation in fp32 (the residual stream stays fp32). Axis letters: docs/dimensions.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import nGPTConfig
from nanomoe.rope import rope_table

from .attention import KVCache, attend
from .layers import (IN_MLP, OUT_MLP, Decoding, Options, apply_rope, check_sequence_length, embed,
                     head_and_loss, linear, make_stack, param, rms_norm, run_stack)

f32 = jnp.float32
ROPE_BASE = 10000.0
ALPHA_TARGET = 0.05
SCALE_FLOOR = 1e-6


def justnorm(x: jax.Array) -> jax.Array:
    """x / (||x||_2 + 1e-8) over the last axis, in fp32."""
    x = x.astype(f32)
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + 1e-8)


def eff(p: jax.Array, c: float) -> jax.Array:
    """``p * c / max|p|`` with the max floored at 1e-6 (ties share the max's gradient)."""
    p = p.astype(f32)
    return p * (c / jnp.maximum(jnp.max(jnp.abs(p)), SCALE_FLOOR))


def half_split_rotary(x_BTQD: jax.Array, table_TD: jax.Array) -> jax.Array:
    """The original's map: sin, cos = the first and second halves of the table rows (its
    names; they are not the sine and cosine of one angle), e, o = the even and odd features;
    concat(e*cos - o*sin, o*cos + e*sin): not a rotation, output in halves
    (docs/original.md#ngpt)."""
    d = x_BTQD.shape[-1] // 2
    sin_T1d, cos_T1d = table_TD[:, None, :d], table_TD[:, None, d:]
    x = x_BTQD.astype(f32)
    e_BTQd, o_BTQd = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([e_BTQd * cos_T1d - o_BTQd * sin_T1d,
                            o_BTQd * cos_T1d + e_BTQd * sin_T1d], axis=-1)


class Block(nnx.Module):
    def __init__(self, c: nGPTConfig, opts: Options, rngs: nnx.Rngs):
        C, s = c.n_embd, c.base_scale
        self.config, self.dtype, self.attention_impl = c, opts.dtype, opts.attention_impl
        self.n_head, self.head_dim = c.n_head, C // c.n_head

        def vector(n, v, axis="embed"):
            return param(jnp.full((n,), v, opts.param_dtype), (axis,))

        self.attn_alpha = vector(C, ALPHA_TARGET * s)
        self.mlp_alpha = vector(C, ALPHA_TARGET * s)
        self.sqk = vector(C, s)
        self.suv = vector(8 * C, s, "mlp")
        self.c_attn = linear(C, 3 * C, opts, rngs, ("embed", "qkv"), bias=False, std=s)
        self.attn_out = linear(C, C, opts, rngs, ("heads", "embed"), bias=False, std=s)
        self.c_mlp = linear(C, 8 * C, opts, rngs, IN_MLP, bias=False, std=s)
        self.mlp_out = linear(4 * C, C, opts, rngs, OUT_MLP, bias=False, std=s)
        self.rms_att = rms_norm(C, opts, rngs)
        self.rms_mlp = rms_norm(C, opts, rngs)

    def rotate(self, x_BTQD, positions_T):
        """Rotary map at absolute positions (rows of the block_size table)."""
        c = self.config
        if c.standard_rope:
            return apply_rope(x_BTQD.astype(f32), ROPE_BASE, positions_T, c.block_size)
        table = jnp.asarray(rope_table(c.block_size, self.head_dim, ROPE_BASE))
        return half_split_rotary(x_BTQD, jnp.take(table, positions_T, axis=0))

    def attention(self, a_BTC, cache: KVCache | None, pos):
        B, T, C = a_BTC.shape
        Q, D = self.n_head, self.head_dim
        qkv_BT3C = self.c_attn(a_BTC)
        q_BTQD, k_BTQD, v_BTQD = (t.reshape(B, T, Q, D) for t in jnp.split(qkv_BT3C, 3, -1))
        positions_T = jnp.arange(T) if cache is None else pos + jnp.arange(T)
        q_BTQD, k_BTQD = self.rotate(q_BTQD, positions_T), self.rotate(k_BTQD, positions_T)
        s_qk_D = eff(self.sqk[...], 1.0)[:D]  # the first hd entries, shared by every head
        q_BTQD = (justnorm(q_BTQD) * s_qk_D).astype(self.dtype)
        k_BTQD = (justnorm(k_BTQD) * s_qk_D).astype(self.dtype)
        v_BTQD = v_BTQD.astype(self.dtype)
        scale = math.sqrt(D) if self.config.paper_attn_scale else 1.0 / math.sqrt(D)
        o_BTQD, cache = attend(q_BTQD, k_BTQD, v_BTQD, scale, self.attention_impl, cache, pos)
        return self.attn_out(o_BTQD.reshape(B, T, C)), cache

    def __call__(self, x_BTC, cache=None, pos=None):
        C = x_BTC.shape[-1]
        y_BTC, cache = self.attention(self.rms_att(x_BTC), cache, pos)
        x_hat_BTC = justnorm(x_BTC)
        alpha_A_C = eff(self.attn_alpha[...], ALPHA_TARGET)
        h_att_BTC = x_hat_BTC + alpha_A_C * (justnorm(y_BTC) - x_hat_BTC)  # not renormalised
        uv_BT8C = self.c_mlp(self.rms_mlp(h_att_BTC)).astype(f32) * eff(self.suv[...], 1.0)
        u_BT4C, g_BT4C = uv_BT8C[..., : 4 * C], uv_BT8C[..., 4 * C:]
        y2_BTC = self.mlp_out(u_BT4C * jax.nn.silu(g_BT4C))  # SiLU on the second half
        alpha_M_C = eff(self.mlp_alpha[...], ALPHA_TARGET)
        h_mlp_BTC = h_att_BTC + alpha_M_C * (justnorm(y2_BTC) - h_att_BTC)
        return justnorm(h_mlp_BTC), None, cache


class nGPT(Decoding, nnx.Module):  # noqa: N801 - the original's name
    config_class = nGPTConfig
    ignore_index = -1

    def __init__(self, config: nGPTConfig, *, rngs: nnx.Rngs, **options):
        self.config, self.opts = config, Options(**options)
        opts, c = self.opts, config
        self.wte = embed(c.vocab_size, c.n_embd, opts, rngs)
        self.blocks = make_stack(lambda r: Block(c, opts, r), c.n_layer, rngs)

    def hidden(self, idx_BT, cache=None, pos=None):
        """Unit-norm hidden states of the last block (no final norm), per-layer aux (None),
        updated cache, of the tokens at pos.."""
        check_sequence_length(idx_BT.shape[1], self.config.block_size)
        return run_stack(self.blocks, self.wte(idx_BT), self.opts, cache, pos)

    def __call__(self, idx_BT: jax.Array, targets_BT: jax.Array | None = None):
        """``(logits, {'loss': loss or None})``, as the original (logits of the tied head)."""
        h_BTC, _, _ = self.hidden(idx_BT)
        logits_BTV, loss = head_and_loss(self.wte, h_BTC, targets_BT, self.opts, self.ignore_index)
        return logits_BTV, {"loss": loss}


def normalize_weights(params):
    """The paper's weight projection (--ngpt_normalize_weights): every weight matrix to unit
    norm along the axis it declares ``embed`` (each parameter's logical axes, layers.py), as
    ``nanomoe_torch.ngpt.normalize_weights`` does (same vectors, same numbers). Vectors
    (scales, norms) are left alone."""
    def one(var):
        if not isinstance(var, nnx.Variable):
            return var
        axes = var.get_metadata("out_sharding")
        if sum(a != "layers" for a in axes) < 2:
            return var
        axis = axes.index("embed")
        return jax.tree.map(lambda p: p / jnp.maximum(
            jnp.sqrt(jnp.sum(p * p, axis=axis, keepdims=True)), 1e-12), var)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
