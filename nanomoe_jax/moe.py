"""The MoE feed-forward: one router, three interchangeable dispatch back ends.

Mirrors ``nanomoe_torch/moe.py``. Experts are stored stacked in the original's layouts
(``fc_weight`` (E, H, C), ``fc_bias`` (E, H), ``proj_weight`` (E, C, H), ``proj_bias`` (E, C)),
each computing ``relu(x W1^T + b1)^2 W2^T + b2``. The first S experts are shared (every token),
the other E - S are routed (top-k per token). Back ends (``config.moe_dispatch``):

* ``dense``: every expert on every token, weighted by the gates (the original's math).
* ``capacity``: assignments stably sorted by expert into a static (E-S, capacity, C) buffer,
  batched expert matmuls, gathered back. FLOPs grow with k, not E; overflow is dropped.
* ``ragged``: the sorted assignments through ``jax.lax.ragged_dot`` (grouped matmul; XLA on
  NVIDIA makes it one dense matmul of every row with every routed expert).
* ``grouped``: the sorted assignments padded to whole tiles per expert, one batched matmul of
  tiles (nanomoe_jax/grouped.py): the work of the assignments plus at most a tile per expert,
  nothing drops.
* ``tokamax``: the sorted assignments, shared experts' included, through grouped GEMMs
  (tokamax's and our gather kernels, nanomoe_jax/ragged_gemm.py), or the shared experts as
  a dense MLP with its own VJP (``Options.shared_dense``, nanomoe_jax/shared_gemm.py):
  NVIDIA GPUs; the same code in XLA elsewhere.

Shared experts run as one dense MLP of width S*H in the other sparse back ends.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import MoeGPTConfig

from .activations import relu_squared
from .expert_mlps import expert_ffn, shared_experts
from .expert_parallel import expert_parallel_dispatch
from .grouped import pick_tile, sort_assignments, tile_layout, tiled_matmul
from .layers import Options, linear, normal, param
from .ragged_gemm import experts
from .shared_gemm import shared_mlp

f32 = jnp.float32
SCOPE = "moe_ffn"


class Routing(NamedTuple):
    gates_NE: jax.Array      # fp32, renormalised over the S + k experts in use, else 0
    top_idx_NK: jax.Array    # routed experts chosen per token, numbered 0..E-S-1
    top_gates_NK: jax.Array  # their renormalised gates (fp32)
    usage_E: jax.Array       # tokens per expert (step 5's usage_count, docs/original.md)
    score_sum_E: jax.Array   # router scores summed over the tokens
    balance_loss: jax.Array  # sum_e f_e * P_e


def balance_loss(usage_E: jax.Array, score_sum_E: jax.Array, n_tokens: int,
                 c: MoeGPTConfig) -> jax.Array:
    """The original's balance loss from token sums (so row groups can add theirs first)."""
    S, k, E = c.n_shared, c.n_activated_experts, c.n_total_experts
    f_E = E / ((S + k) * n_tokens) * usage_E                                  # 7
    P_E = score_sum_E / n_tokens
    return jnp.sum(f_E * P_E)


def route(logits_NE: jax.Array, c: MoeGPTConfig) -> Routing:
    """The original's router on fp32 logits; the # N step comments are docs/original.md's
    (MoeGPT, router)."""
    S, k, E = c.n_shared, c.n_activated_experts, c.n_total_experts
    N = logits_NE.shape[0]
    logits_NE = logits_NE.astype(f32)
    if c.route_score_func == "softmax":
        scores_NE = jax.nn.softmax(logits_NE, axis=-1)                        # 1
    else:
        scores_NE = jax.nn.sigmoid(logits_NE)
    score_sum_E = scores_NE.sum(0)                                            # 2
    shared_NS = scores_NE[:, :S] * c.route_scale                              # 3
    top_vals_NK, top_idx_NK = jax.lax.top_k(scores_NE[:, S:], k)
    top_vals_NK = top_vals_NK * c.route_scale
    # 5: tokens whose combined weight is > 0 (before renormalisation), no gradient
    usage_E = jnp.concatenate([
        (shared_NS > 0).sum(0).astype(f32),
        jnp.zeros(E - S, f32).at[top_idx_NK].add((top_vals_NK > 0).astype(f32)),
    ])
    usage_E = jax.lax.stop_gradient(usage_E)
    denom_N1 = shared_NS.sum(-1, keepdims=True) + top_vals_NK.sum(-1, keepdims=True) + 1e-8
    shared_NS, top_gates_NK = shared_NS / denom_N1, top_vals_NK / denom_N1   # 4
    routed_NR = jnp.zeros((N, E - S), f32).at[jnp.arange(N)[:, None], top_idx_NK].set(top_gates_NK)
    gates_NE = jnp.concatenate([shared_NS, routed_NR], axis=-1)
    return Routing(gates_NE, top_idx_NK, top_gates_NK, usage_E, score_sum_E,
                   balance_loss(usage_E, score_sum_E, N, c))


class MoE(nnx.Module):
    def __init__(self, c: MoeGPTConfig, opts: Options, rngs: nnx.Rngs):
        self.config, self.opts = c, opts
        E, H, C = c.n_total_experts, c.expert_hidden, c.n_embd
        # the router computes in fp32 whatever the activations' dtype; its E outputs are
        # "router", not "experts": every device scores every expert for its own tokens
        self.gate_linear = linear(C, E, opts, rngs, ("embed", "router"), bias=c.use_bias,
                                  dtype=f32)
        pd = opts.param_dtype
        self.fc_weight = param(normal(0.02)(rngs.params(), (E, H, C), pd),
                               ("experts", "mlp", "embed"))
        self.fc_bias = param(jnp.zeros((E, H), pd), ("experts", "mlp"))
        # the original starts it at 0
        self.proj_weight = param(jnp.zeros((E, C, H), pd), ("experts", "embed", "mlp"))
        self.proj_bias = param(jnp.zeros((E, C), pd), ("experts", "embed"))

    def __call__(self, x_BTC: jax.Array) -> tuple[jax.Array, dict]:
        # the scope names the layer's kernels in the compiled program (the plan's MoE bytes)
        with jax.named_scope(SCOPE):
            return self._forward(x_BTC)

    def _forward(self, x_BTC: jax.Array) -> tuple[jax.Array, dict]:
        c, dtype = self.config, self.opts.dtype
        dispatch = self.opts.moe_dispatch or c.moe_dispatch
        B, T, C = x_BTC.shape
        # capacity: tokens in position-major order (t, b), so slots go to earlier positions
        # first and a token's drop never depends on later tokens of any row (causal). The
        # dropless back ends take the rows as they are (no transposed copy, there and back).
        position_major = dispatch == "capacity" or self.opts.expert_mesh is not None
        x_NC = (x_BTC.transpose(1, 0, 2) if position_major else x_BTC).reshape(B * T, C)
        r = route(self.gate_linear(x_NC.astype(f32)), c)  # router in fp32
        x_NC = x_NC.astype(dtype)
        params = [p[...] for p in (self.fc_weight, self.fc_bias, self.proj_weight, self.proj_bias)]
        w = [p.astype(dtype) for p in params]
        if self.opts.expert_mesh is not None:  # capacity or tokamax (train.py refuses others)
            y_NC, dropped = expert_parallel_dispatch(x_NC, r, w, c, self.opts.expert_mesh,
                                                     grouped=dispatch == "tokamax",
                                                     shared_dense=self.opts.shared_dense)
        elif dispatch == "dense":
            y_NC, dropped = dense_dispatch(x_NC, r, w), jnp.zeros((), f32)
        elif dispatch == "tokamax":  # shared and routed; the parameters whole: see expert_sum
            y_NC = tokamax_dispatch(x_NC, r, params, c.n_shared, self.opts.shared_dense)
            dropped = jnp.zeros((), f32)
        else:
            S = c.n_shared
            y_NC = shared_experts(x_NC, r.gates_NE[:, :S], [a[:S] for a in w])
            routed_w = [a[S:] for a in w]
            if dispatch == "capacity":
                y_r, dropped = capacity_dispatch(x_NC, r, routed_w, c.capacity(B * T))
            elif dispatch == "grouped":
                y_r, dropped = grouped_dispatch(x_NC, r, routed_w), jnp.zeros((), f32)
            else:
                y_r, dropped = ragged_dispatch(x_NC, r, routed_w), jnp.zeros((), f32)
            y_NC = y_NC + y_r
        metrics = {"balance_loss": r.balance_loss, "tokens_per_expert": r.usage_E,
                   "score_sum": r.score_sum_E, "dropped_fraction": dropped / r.top_idx_NK.size}
        y = y_NC.astype(x_BTC.dtype)
        return (y.reshape(T, B, C).transpose(1, 0, 2) if position_major
                else y.reshape(B, T, C)), metrics


def dense_dispatch(x_NC, r: Routing, w) -> jax.Array:
    """All E experts on all N tokens, summed with the gates in fp32 (the original's math)."""
    E = r.gates_NE.shape[1]
    y_ENC = expert_ffn(jnp.broadcast_to(x_NC, (E, *x_NC.shape)), *w)
    return jnp.einsum("ne,enc->nc", r.gates_NE, y_ENC.astype(f32))


def capacity_dispatch(x_NC, r: Routing, w, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Static (R, capacity, C) buffer filled by a gather; assignments past capacity drop.
    (An expert mesh has its own: ``expert_parallel.py``.)"""
    R = w[0].shape[0]
    N, K = r.top_idx_NK.shape
    s = sort_assignments(r.top_idx_NK, R)
    slot_P = jnp.arange(capacity)
    src_RP = s.starts_R[:, None] + slot_P[None]                     # sorted position per slot
    filled_RP = slot_P[None] < s.counts_R[:, None]
    token_RP = s.token_sorted_A[jnp.clip(src_RP, 0, N * K - 1)]
    x_RPC = jnp.where(filled_RP[..., None], x_NC[token_RP], 0).astype(x_NC.dtype)
    y_RPC = expert_ffn(x_RPC, *w)
    pos_A = s.rank_A - s.starts_R[s.expert_A]                         # slot of each assignment
    kept_A = pos_A < capacity
    y_AC = y_RPC[s.expert_A, jnp.minimum(pos_A, capacity - 1)].astype(f32)
    y_AC = jnp.where(kept_A[:, None], y_AC, 0.0)
    y_NC = jnp.einsum("nk,nkc->nc", r.top_gates_NK, y_AC.reshape(N, K, -1))
    return y_NC, jnp.sum(~kept_A).astype(f32)


def ragged_dispatch(x_NC, r: Routing, w) -> jax.Array:
    """Grouped matmuls over the expert-sorted assignments (no capacity, nothing drops)."""
    w1_RHC, b1_RH, w2_RCH, b2_RC = w
    N, K = r.top_idx_NK.shape
    s = sort_assignments(r.top_idx_NK, w1_RHC.shape[0])
    x_AC = x_NC[s.token_sorted_A]
    h_AH = jax.lax.ragged_dot(x_AC, w1_RHC.transpose(0, 2, 1), s.counts_R) + b1_RH[s.expert_sorted_A]
    h_AH = relu_squared(h_AH)
    y_AC = jax.lax.ragged_dot(h_AH, w2_RCH.transpose(0, 2, 1), s.counts_R) + b2_RC[s.expert_sorted_A]
    y_NKC = y_AC[s.rank_A].astype(f32).reshape(N, K, -1)
    return jnp.einsum("nk,nkc->nc", r.top_gates_NK, y_NKC)


def grouped_dispatch(x_NC, r: Routing, w, tile: int | None = None) -> jax.Array:
    """The sorted assignments in whole tiles per expert through :func:`tiled_matmul`: the
    numbers of ``ragged_dispatch`` (no capacity, nothing drops), the work of the padded groups."""
    w1_RHC, b1_RH, w2_RCH, b2_RC = w
    N, K = r.top_idx_NK.shape
    R, A, C = w1_RHC.shape[0], N * K, x_NC.shape[1]
    tile = tile or pick_tile(A, R)
    s = sort_assignments(r.top_idx_NK, R)
    lay = tile_layout(s.counts_R, A, tile)
    filled_P = lay.src_P >= 0
    x_PC = jnp.where(filled_P[:, None], x_NC[s.token_sorted_A[jnp.maximum(lay.src_P, 0)]], 0)
    x_nMC = x_PC.reshape(-1, tile, C).astype(x_NC.dtype)
    g_n = lay.tile_expert_n
    h_nMH = relu_squared(tiled_matmul(x_nMC, w1_RHC, g_n) + b1_RH[g_n][:, None])
    y_nMC = tiled_matmul(h_nMH, w2_RCH, g_n) + b2_RC[g_n][:, None]
    y_AC = y_nMC.reshape(-1, C)[lay.dest_A]                 # back to the sorted order
    y_NKC = y_AC[s.rank_A].astype(f32).reshape(N, K, C)
    return jnp.einsum("nk,nkc->nc", r.top_gates_NK, y_NKC)


def tokamax_dispatch(x_NC, r: Routing, params, S: int, shared_dense: bool = False) -> jax.Array:
    """Experts through grouped GEMMs that read each expert's weights once
    (``nanomoe_jax/ragged_gemm.py``: tokamax's and ours), nothing dropped. The S shared
    experts are S more assignments a token, their groups every token in order (one kernel path
    for both kinds: the XLA MLP kept three (N, H) residuals a layer); or, ``shared_dense``,
    one dense MLP of width S*H with its own VJP (``nanomoe_jax/shared_gemm.py``: x and the
    output gradient read once, not S times; no S output rows a token to sum), which pays
    where the grouped GEMMs are bandwidth-bound (``execution.shared_dense_pays``). Routed
    experts then keep their ids among all E, so the stacked weights go to the kernels whole
    (the shared experts' groups empty)."""
    N = r.top_idx_NK.shape[0]
    if shared_dense and S:
        expert_NK = r.top_idx_NK + S
        s = sort_assignments(expert_NK, params[0].shape[0])
        y_NC = experts(x_NC, r.top_gates_NK, expert_NK, s, params)
        return y_NC + shared_mlp(x_NC, r.gates_NE[:, :S], *[p[:S] for p in params])
    expert_Nj = jnp.concatenate([jnp.broadcast_to(jnp.arange(S, dtype=r.top_idx_NK.dtype),
                                                  (N, S)), r.top_idx_NK + S], axis=1)
    gates_Nj = jnp.concatenate([r.gates_NE[:, :S], r.top_gates_NK], axis=1)
    s = sort_assignments(expert_Nj, params[0].shape[0])
    return experts(x_NC, gates_Nj, expert_Nj, s, params)
