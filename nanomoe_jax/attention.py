"""Causal self-attention for training, with a hand-written backward pass for CPUs.

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
key/value head j // G.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

f32 = jnp.float32
QUERY_BLOCK = 64  # query rows per block (measured: 32 and 128 slower at T=256)
MAX_BLOCKS = 8    # longer blocks past 8 * QUERY_BLOCK keep the graph small


def causal_attention(q_BTNH, k_BSKH, v_BSKH, scale: float, impl: str | None = None):
    """Causal attention of T queries over as many keys (training, no cache); (B, T, N, H)."""
    if impl != "custom_vjp":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True,
                                            implementation=impl)
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    # Query blocks: block i attends to keys [0, end_i) only, so most of the masked upper
    # triangle is never computed, and each block's scores stay small enough for a core's
    # cache. Every block is an exact softmax over its rows (no online rescaling needed).
    outs, start = [], 0
    for end in query_block_ends(T):
        outs.append(_attention(q_BTKGH[:, start:end], k_BSKH[:, :end], v_BSKH[:, :end],
                               scale, start))
        start = end
    o_BTKGH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o_BTKGH.reshape(B, T, N, H)


def query_block_ends(T: int) -> list[int]:
    """Ends of the query blocks: QUERY_BLOCK rows each (longer ones past MAX_BLOCKS)."""
    n = min(MAX_BLOCKS, max(1, -(-T // QUERY_BLOCK)))
    return [round(T * (i + 1) / n) for i in range(n)]


def _probabilities(q_BTKGH, k_BSKH, scale, offset):
    """Unnormalised causal probabilities p (fp32, B K G T S) and 1 / their row sums; query t
    sits at position offset + t."""
    s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=f32) * scale
    T, S = s.shape[-2:]
    causal_TS = offset + jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
    s = jnp.where(causal_TS, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p, 1.0 / jnp.sum(p, axis=-1)


def _per_query(x_BKGT):
    """(B, K, G, T) row statistics laid out like the output (B, T, K, G, 1)."""
    return x_BKGT.transpose(0, 3, 1, 2)[..., None]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q_BTKGH, k_BSKH, v_BSKH, scale, offset):
    return _forward(q_BTKGH, k_BSKH, v_BSKH, scale, offset)[0]


def _forward(q_BTKGH, k_BSKH, v_BSKH, scale, offset):
    p, inv_BKGT = _probabilities(q_BTKGH, k_BSKH, scale, offset)
    o = jnp.einsum("bkgts,bskh->btkgh", p.astype(v_BSKH.dtype), v_BSKH,
                   preferred_element_type=f32) * _per_query(inv_BKGT)
    o = o.astype(q_BTKGH.dtype)
    return o, (q_BTKGH, k_BSKH, v_BSKH, p, inv_BKGT, o)


def _backward(scale, offset, res, do_BTKGH):
    q, k, v, p, inv_BKGT, o = res
    dtype = q.dtype
    # with P = p / l: dS = P (dP - D), D = rowsum(dO * O); computed as p (dP/l - D/l)
    d_BKGT = jnp.einsum("btkgh,btkgh->bkgt", do_BTKGH.astype(f32), o.astype(f32)) * inv_BKGT
    do_l = (do_BTKGH.astype(f32) * _per_query(inv_BKGT)).astype(dtype)       # dO / l
    dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(dtype), do_l, preferred_element_type=f32)
    dp = jnp.einsum("btkgh,bskh->bkgts", do_l, v, preferred_element_type=f32)
    ds = (p * (dp - d_BKGT[..., None])).astype(dtype)
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k, preferred_element_type=f32) * scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, q, preferred_element_type=f32) * scale
    return dq.astype(dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_forward, _backward)
