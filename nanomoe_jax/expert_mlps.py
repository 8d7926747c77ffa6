"""The experts' MLP on rows every expert sees in full (dense): ``relu(x W1^T + b1)^2 W2^T + b2``
per expert, the S shared experts as one MLP of width S*H, and the gated sum of the routed
rows that come back to a token. Used by the MoE back ends in ``moe.py`` and by the
expert-parallel dispatch (``expert_parallel.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import relu_squared

f32 = jnp.float32


def expert_ffn(x_GMC, w1_GHC, b1_GH, w2_GCH, b2_GC):
    """G experts on their own rows: ``relu(x W1^T + b1)^2 W2^T + b2`` (compute dtype)."""
    h_GMH = relu_squared(jnp.einsum("gmc,ghc->gmh", x_GMC, w1_GHC) + b1_GH[:, None])
    return jnp.einsum("gmh,gch->gmc", h_GMH, w2_GCH) + b2_GC[:, None]


def shared_experts(x_NC, gates_NS, w) -> jax.Array:
    """The S shared experts as one MLP of width S*H; each token's hidden units are scaled by
    its gate for that expert, so the output projection is a single (S*H -> C) matmul."""
    w1_SHC, b1_SH, w2_SCH, b2_SC = w
    if w1_SHC.shape[0] == 0:
        return jnp.zeros(x_NC.shape, f32)
    h_NSH = relu_squared(jnp.einsum("nc,shc->nsh", x_NC, w1_SHC) + b1_SH)
    # the gate rounded to the compute dtype, not h widened to fp32: the backward then keeps
    # h in the compute dtype for the gates' gradient (an fp32 copy was 2x the bytes)
    hg_NSH = h_NSH * gates_NS[..., None].astype(x_NC.dtype)
    return (jnp.einsum("nsh,sch->nc", hg_NSH, w2_SCH).astype(f32)
            + gates_NS @ b2_SC.astype(f32))


@jax.custom_vjp
def gated_sum(y_AC, kept_A, top_gates_NK):
    """The routed experts' outputs of each token (``y_AC``: the compute dtype, assignment
    order), gated in fp32; a dropped assignment's gate is 0 (its row must be finite: the
    exchange leaves it zero or another row's copy)."""
    N, K = top_gates_NK.shape
    # the mask on the (N, K) gates, not on the rows: a select on the rows made XLA keep an
    # fp32 (N K, C) array of zeros for it (read once a layer)
    g_NK = jnp.where(kept_A.reshape(N, K), top_gates_NK, 0.0)
    return jnp.einsum("nk,nkc->nc", g_NK, y_AC.astype(f32).reshape(N, K, -1))


def _gated_fwd(y_AC, kept_A, top_gates_NK):
    # y in its own dtype and the mask per row: autodiff kept an fp32 copy of y and the mask
    # broadcast to its width, stacked over the layers (2.7 GB a step on MoeGPT-64, expert=8)
    return gated_sum(y_AC, kept_A, top_gates_NK), (y_AC, kept_A, top_gates_NK)


def _gated_bwd(res, dout_NC):
    y_AC, kept_A, top_gates_NK = res
    N, K = top_gates_NK.shape
    kept_NK = kept_A.reshape(N, K)
    g_NK = jnp.where(kept_NK, top_gates_NK, 0.0)
    dy_AC = (g_NK[..., None] * dout_NC[:, None, :]).astype(y_AC.dtype).reshape(N * K, -1)
    dg_NK = jnp.einsum("nc,nkc->nk", dout_NC, y_AC.astype(f32).reshape(N, K, -1))
    return dy_AC, None, jnp.where(kept_NK, dg_NK, 0.0)


gated_sum.defvjp(_gated_fwd, _gated_bwd)
