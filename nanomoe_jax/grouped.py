"""A grouped matmul made of dense tiles: the rows of each expert padded to whole tiles of
``tile`` rows, every tile multiplied by its own expert's weights in one batched matmul.

XLA on NVIDIA has no grouped GEMM for ``jax.lax.ragged_dot`` (it becomes one dense matmul of
every row with every expert); here the work is the padded groups only: at most
``rows + groups * (tile - 1)`` rows, each times one expert. The price is bandwidth: each tile
reads its expert's weights (a gather of (tiles, out, in)), which the backward pass gathers
again instead of keeping (a ``custom_vjp`` saves only the inputs).

Also here, for every sparse back end (moe.py, expert_parallel.py, ragged_gemm.py): the
stable sort of the (token, expert) assignments by expert they all start from.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32
# names the matmuls in the compiled program's metadata (op_name), so a plan can tell them apart
SCOPE = "grouped_gemm"


class TileLayout(NamedTuple):
    """Where the expert-sorted rows go in the padded, tiled buffer of ``n_tiles * tile`` rows."""

    dest_A: jax.Array         # padded row of each sorted row
    src_P: jax.Array          # sorted row of each padded row (-1: padding)
    tile_expert_n: jax.Array  # expert of each tile (empty tail tiles: the last expert, rows 0)


def padded_rows(n_rows: int, n_groups: int, tile: int) -> int:
    """Static size of the buffer: every group rounded up to whole tiles fits in it."""
    return (n_rows + n_groups * (tile - 1)) // tile * tile


def pick_tile(n_rows: int, n_groups: int) -> int:
    """The largest tile (64..512 rows, a power of two) whose worst-case padding,
    ``groups * (tile - 1)`` rows, stays within 1/16 of the rows: bigger tiles mean fewer
    weight reads, smaller ones less padding."""
    tile = 512
    while tile > 64 and n_groups * (tile - 1) > n_rows / 16:
        tile //= 2
    return tile


def tile_layout(counts_R: jax.Array, n_rows: int, tile: int) -> TileLayout:
    """Layout of ``n_rows`` rows already sorted by group, ``counts_R`` rows per group."""
    R = counts_R.shape[0]
    P = padded_rows(n_rows, R, tile)
    starts_R = jnp.cumsum(counts_R) - counts_R
    padded_R = -(-counts_R // tile) * tile
    pends_R = jnp.cumsum(padded_R)
    pstarts_R = pends_R - padded_R
    group_A = jnp.repeat(jnp.arange(R), counts_R, total_repeat_length=n_rows)
    dest_A = pstarts_R[group_A] + jnp.arange(n_rows) - starts_R[group_A]
    src_P = jnp.full((P,), -1, jnp.int32).at[dest_A].set(jnp.arange(n_rows, dtype=jnp.int32))
    tile_start_n = jnp.arange(P // tile) * tile
    tile_expert_n = jnp.minimum(jnp.searchsorted(pends_R, tile_start_n, side="right"), R - 1)
    return TileLayout(dest_A, src_P, tile_expert_n)


@jax.custom_vjp
def tiled_matmul(x_nMI: jax.Array, w_GOI: jax.Array, group_n: jax.Array) -> jax.Array:
    """``y[n] = x[n] @ w[group[n]]^T`` for every tile n; weights stored (group, out, in)."""
    with jax.named_scope(SCOPE):
        return jnp.einsum("nmi,noi->nmo", x_nMI, w_GOI[group_n])


def _fwd(x_nMI, w_GOI, group_n):
    return tiled_matmul(x_nMI, w_GOI, group_n), (x_nMI, w_GOI, group_n)


def _bwd(res, dy_nMO):
    x_nMI, w_GOI, group_n = res
    with jax.named_scope(SCOPE):
        return _grads(x_nMI, w_GOI, group_n, dy_nMO)


def _grads(x_nMI, w_GOI, group_n, dy_nMO):
    dx_nMI = jnp.einsum("nmo,noi->nmi", dy_nMO, w_GOI[group_n])
    dw_nOI = jnp.einsum("nmo,nmi->noi", dy_nMO, x_nMI, preferred_element_type=f32)
    dw_GOI = jnp.zeros(w_GOI.shape, f32).at[group_n].add(dw_nOI)
    return dx_nMI, dw_GOI.astype(w_GOI.dtype), None


tiled_matmul.defvjp(_fwd, _bwd)


class SortedAssignments(NamedTuple):
    """The N*k (token, expert) assignments stably sorted by expert."""

    expert_A: jax.Array      # expert of each assignment, in token-major order (A = N*k)
    token_sorted_A: jax.Array
    expert_sorted_A: jax.Array
    rank_A: jax.Array        # where each assignment landed in the sorted order
    counts_R: jax.Array      # assignments per routed expert
    starts_R: jax.Array      # first sorted position of each expert
    order_A: jax.Array       # assignment (token-major index) at each sorted position


def sort_assignments(top_idx_NK: jax.Array, n_routed: int) -> SortedAssignments:
    N, K = top_idx_NK.shape
    expert_A = top_idx_NK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)  # ties keep token order: earlier tokens first
    rank_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(N * K, dtype=order_A.dtype))
    counts_R = jnp.zeros(n_routed, jnp.int32).at[expert_A].add(1)
    starts_R = jnp.cumsum(counts_R) - counts_R
    return SortedAssignments(expert_A, order_A // K, expert_A[order_A], rank_A, counts_R, starts_R,
                             order_A)


def every_token_assignments(N: int, S: int) -> SortedAssignments:
    """What :func:`sort_assignments` gives when each of N tokens uses all S experts (the
    shared ones): known from the shapes, so the step sorts nothing."""
    i32 = jnp.int32
    e_SN = jnp.broadcast_to(jnp.arange(S, dtype=i32)[:, None], (S, N))
    n_SN = jnp.broadcast_to(jnp.arange(N, dtype=i32)[None, :], (S, N))
    order_A = (n_SN * S + e_SN).reshape(-1)            # expert by expert, tokens in order
    rank_A = (e_SN * N + n_SN).T.reshape(-1)           # token-major
    counts_R = jnp.full((S,), N, i32)
    return SortedAssignments(e_SN.T.reshape(-1), n_SN.reshape(-1), e_SN.reshape(-1), rank_A,
                             counts_R, jnp.arange(S, dtype=i32) * N, order_A)


@jax.custom_vjp
def permuted_rows(rows_PC: jax.Array, pos_A: jax.Array, order_A: jax.Array) -> jax.Array:
    """``rows[pos]`` where ``pos`` and ``order`` are inverse permutations (each row read
    once): the gradient is then the gather ``g[order]``, not a gather's transpose (a
    scatter-add into a zeroed array, which cannot know that no row is hit twice)."""
    return rows_PC[pos_A]


def _perm_fwd(rows_PC, pos_A, order_A):
    return rows_PC[pos_A], order_A


def _perm_bwd(order_A, g_AC):
    return g_AC[order_A], None, None


permuted_rows.defvjp(_perm_fwd, _perm_bwd)
