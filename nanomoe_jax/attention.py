"""Causal self-attention: for training, with a hand-written backward pass for CPUs, and over
a KV cache for decoding (:func:`attend`, which every model's attention calls).

``causal_attention(q, k, v, scale, impl)``: ``impl`` None/"xla"/"cudnn" is
``jax.nn.dot_product_attention``; ``"custom_vjp"`` (what ``execution_options`` picks on CPU)
is the same math with a VJP written for few passes over the (B, heads, T, T) scores:

* forward: masked scores, their row max, ``p = exp(s - max)`` left unnormalised, and the
  normalisation applied to the (T, head_dim) output instead of the (T, T) probabilities;
* saved: ``p`` and ``1/rowsum(p)`` (no second copy of the probabilities, no transposed copy);
* backward: flash attention's identity ``dS = P * (dP - rowsum(dO * O))``, whose row sum runs
  over head_dim instead of T, so the whole softmax backward is one pass over ``p``;
* query blocks of ``QUERY_BLOCK`` rows, each over its key prefix only: the causal mask's upper
  triangle is mostly skipped (5/8 of the scores computed at 4 blocks) and a block's scores
  stay in a core's cache. The MoeGPT CPU preset (T=256) trained ~10 % faster per step.

XLA's autodiff of the reference makes about four such passes each way plus layout copies: on 2
CPU cores the attention's forward and backward ran ~3x faster at T=256 and ~1.5x at T=64
(benchmarks/NOTES.md, "Attention with its own VJP"). Memory: the blocks' probabilities are
saved, at most one (T, T) array per layer. Grouped-query attention: query head j reads
key/value head j // U. Axis letters: docs/dimensions.md.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32
QUERY_BLOCK = 64  # query rows per block (measured: 32 and 128 slower at T=256)
MAX_BLOCKS = 8    # longer blocks past 8 * QUERY_BLOCK keep the graph small


def causal_attention(q_BTQD, k_BZJD, v_BZJD, scale: float, impl: str | None = None):
    """Causal attention of T queries over as many keys (training, no cache); (B, T, Q, D)."""
    if impl != "custom_vjp":
        return jax.nn.dot_product_attention(q_BTQD, k_BZJD, v_BZJD, scale=scale, is_causal=True,
                                            implementation=impl)
    B, T, Q, D = q_BTQD.shape
    J = k_BZJD.shape[2]
    q_BTJUD = q_BTQD.reshape(B, T, J, Q // J, D)
    # Query blocks: block i attends to keys [0, end_i) only, so most of the masked upper
    # triangle is never computed, and each block's scores stay small enough for a core's
    # cache. Every block is an exact softmax over its rows (no online rescaling needed).
    outs, start = [], 0
    for end in query_block_ends(T):
        outs.append(_attention(q_BTJUD[:, start:end], k_BZJD[:, :end], v_BZJD[:, :end],
                               scale, start))
        start = end
    o_BTJUD = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o_BTJUD.reshape(B, T, Q, D)


def query_block_ends(T: int) -> list[int]:
    """Ends of the query blocks: QUERY_BLOCK rows each (longer ones past MAX_BLOCKS)."""
    n = min(MAX_BLOCKS, max(1, -(-T // QUERY_BLOCK)))
    return [round(T * (i + 1) / n) for i in range(n)]


def _probabilities(q_BTJUD, k_BZJD, scale, offset):
    """Unnormalised causal probabilities p (fp32, B J U T Z) and 1 / their row sums; query t
    sits at position offset + t."""
    s = jnp.einsum("btjud,bzjd->bjutz", q_BTJUD, k_BZJD, preferred_element_type=f32) * scale
    T, Z = s.shape[-2:]
    causal_TZ = offset + jnp.arange(T)[:, None] >= jnp.arange(Z)[None, :]
    s = jnp.where(causal_TZ, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p, 1.0 / jnp.sum(p, axis=-1)


def _per_query(x_BJUT):
    """(B, J, U, T) row statistics laid out like the output (B, T, J, U, 1)."""
    return x_BJUT.transpose(0, 3, 1, 2)[..., None]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q_BTJUD, k_BZJD, v_BZJD, scale, offset):
    return _forward(q_BTJUD, k_BZJD, v_BZJD, scale, offset)[0]


def _forward(q_BTJUD, k_BZJD, v_BZJD, scale, offset):
    p, inv_BJUT = _probabilities(q_BTJUD, k_BZJD, scale, offset)
    o = jnp.einsum("bjutz,bzjd->btjud", p.astype(v_BZJD.dtype), v_BZJD,
                   preferred_element_type=f32) * _per_query(inv_BJUT)
    o = o.astype(q_BTJUD.dtype)
    return o, (q_BTJUD, k_BZJD, v_BZJD, p, inv_BJUT, o)


def _backward(scale, offset, res, do_BTJUD):
    q, k, v, p, inv_BJUT, o = res
    dtype = q.dtype
    # with P = p / l: dS = P (dP - D), D = rowsum(dO * O); computed as p (dP/l - D/l)
    d_BJUT = jnp.einsum("btjud,btjud->bjut", do_BTJUD.astype(f32), o.astype(f32)) * inv_BJUT
    do_l = (do_BTJUD.astype(f32) * _per_query(inv_BJUT)).astype(dtype)       # dO / l
    dv = jnp.einsum("bjutz,btjud->bzjd", p.astype(dtype), do_l, preferred_element_type=f32)
    dp = jnp.einsum("btjud,bzjd->bjutz", do_l, v, preferred_element_type=f32)
    ds = (p * (dp - d_BJUT[..., None])).astype(dtype)
    dq = jnp.einsum("bjutz,bzjd->btjud", ds, k, preferred_element_type=f32) * scale
    dk = jnp.einsum("bjutz,btjud->bzjd", ds, q, preferred_element_type=f32) * scale
    return dq.astype(dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_forward, _backward)


class KVCache(NamedTuple):
    """Keys and values of every position so far, for one layer (stacked: one per layer)."""

    k_BZJD: jax.Array
    v_BZJD: jax.Array


def init_cache(n_layer: int, batch: int, length: int, n_kv_head: int, head_dim: int,
               dtype) -> KVCache:
    shape = (n_layer, batch, length, n_kv_head, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def attend(q_BTQD, k_BTJD, v_BTJD, scale: float, impl: str | None, cache: KVCache | None = None,
           pos: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Causal attention of T new positions (q, k, v already rotated, normed, in the compute
    dtype): over one another when training; with a cache, their keys and values written into
    it at pos..pos+T-1 and each query over every cached position up to its own."""
    if cache is None:
        return causal_attention(q_BTQD, k_BTJD, v_BTJD, scale, impl), None
    T, dtype = q_BTQD.shape[1], q_BTQD.dtype

    def write(c_BZJD, x_BTJD):
        return jax.lax.dynamic_update_slice_in_dim(c_BZJD, x_BTJD.astype(c_BZJD.dtype), pos, 1)

    cache = KVCache(write(cache.k_BZJD, k_BTJD), write(cache.v_BZJD, v_BTJD))
    Z = cache.k_BZJD.shape[1]
    mask_11TZ = (jnp.arange(Z)[None, :] <= (pos + jnp.arange(T))[:, None])[None, None]
    y_BTQD = jax.nn.dot_product_attention(q_BTQD, cache.k_BZJD.astype(dtype),
                                          cache.v_BZJD.astype(dtype), mask=mask_11TZ, scale=scale)
    return y_BTQD, cache
