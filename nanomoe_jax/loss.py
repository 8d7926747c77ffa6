"""The tied-head cross-entropy, fused with its gradient: no logits recompute in the backward.

``tied_cross_entropy(h_NC, w_VC, targets_N, ...)`` is the mean next-token loss over the
targets that are not ``ignore_index``, with logits ``h @ w^T`` computed ``chunk`` tokens at a
time (matmul in the compute ``dtype`` as under autocast, log-softmax in fp32), so only one
chunk's (chunk, V) logits ever exist.

Under differentiation (a ``jax.custom_vjp``) the forward pass also produces, chunk by chunk,
the gradients with respect to ``h`` and ``w`` while each chunk's probabilities are at hand;
the backward pass only scales them by the incoming cotangent. That is 6*C*V FLOPs per token
(logits, dh, dw) instead of 8*C*V for a checkpointed chunk whose logits are recomputed.
A call that is not differentiated (evaluation) runs the plain chunked loss and computes no
gradient.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .row_lse import row_lse

f32 = jnp.float32


def _chunked(h_NC, targets_N, ignore_index: int, chunk: int):
    """(h (n, M, C), targets (n, M)) in chunks of M tokens; the tail is padded with ignored
    targets (zero rows), which add nothing to the loss or the gradients."""
    N = h_NC.shape[0]
    chunk = min(chunk, N)  # never pad a small batch up to a whole chunk
    n = -(-N // chunk)
    pad = n * chunk - N
    if pad:
        h_NC = jnp.pad(h_NC, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad), constant_values=ignore_index)
    return h_NC.reshape(n, chunk, -1), targets_N.reshape(n, chunk)


def _chunk_nll(h_MC, w_VC, t_M, ignore_index: int, dtype):
    """Logits of one chunk (the compute dtype, as under autocast), their fp32 log-sum-exp, the
    valid mask and the summed nll. The log-sum-exp and the target's logit come from one read
    of the logits on a GPU (``row_lse.py``)."""
    logits_MV = jnp.einsum("mc,vc->mv", h_MC.astype(dtype), w_VC.astype(dtype))
    valid_M = t_M != ignore_index
    t_M = jnp.where(valid_M, t_M, 0)
    lse_M, target_logit_M = row_lse(logits_MV, t_M)
    nll = jnp.sum(jnp.where(valid_M, lse_M - target_logit_M, 0.0))
    return logits_MV, lse_M, valid_M, t_M, nll


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def tied_cross_entropy(h_NC, w_VC, targets_N, ignore_index: int, chunk: int, dtype):
    """Mean fp32 cross-entropy of ``h @ w^T`` over targets != ignore_index (see module)."""
    h_nMC, t_nM = _chunked(h_NC, targets_N, ignore_index, chunk)

    def body(total, xs):
        h_MC, t_M = xs
        return total + _chunk_nll(h_MC, w_VC, t_M, ignore_index, dtype)[-1], None

    total, _ = jax.lax.scan(body, jnp.zeros((), f32), (h_nMC, t_nM))
    return total / jnp.sum(targets_N != ignore_index)


def _fwd(h_NC, w_VC, targets_N, ignore_index, chunk, dtype):
    N, C = h_NC.shape
    count = jnp.sum(targets_N != ignore_index)
    h_nMC, t_nM = _chunked(h_NC, targets_N, ignore_index, chunk)
    w_c = w_VC.astype(dtype)

    def body(carry, xs):
        total, dw_VC = carry
        h_MC, t_M = xs
        logits_MV, lse_M, valid_M, t_M, nll = _chunk_nll(h_MC, w_VC, t_M, ignore_index, dtype)
        # d(sum nll)/d logits = softmax - onehot(target), zero on ignored rows; / count here
        # so the saved gradients are those of the mean. With nothing counted the mean is 0/0
        # (NaN, as torch) but the saved gradients stay 0, so a caller that masks this loss out
        # (row_groups.py) gets no NaN through its zero cotangent.
        p_MV = jnp.exp(logits_MV.astype(f32) - lse_M[:, None])
        g_MV = p_MV - jax.nn.one_hot(t_M, logits_MV.shape[-1], dtype=f32)
        g_MV = (jnp.where(valid_M[:, None], g_MV, 0.0) / jnp.maximum(count, 1)).astype(dtype)
        dh_MC = jnp.einsum("mv,vc->mc", g_MV, w_c, preferred_element_type=f32)
        dw_VC = dw_VC + jnp.einsum("mv,mc->vc", g_MV, h_MC.astype(dtype),
                                   preferred_element_type=f32)
        return (total + nll, dw_VC), dh_MC

    init = (jnp.zeros((), f32), jnp.zeros(w_VC.shape, f32))
    (total, dw_VC), dh_nMC = jax.lax.scan(body, init, (h_nMC, t_nM))
    dh_NC = dh_nMC.reshape(-1, C)[:N]
    return total / count, (dh_NC.astype(h_NC.dtype), dw_VC.astype(w_VC.dtype))


def _bwd(ignore_index, chunk, dtype, res, ct):
    dh_NC, dw_VC = res
    return dh_NC * ct.astype(dh_NC.dtype), dw_VC * ct.astype(dw_VC.dtype), None


tied_cross_entropy.defvjp(_fwd, _bwd)
