"""Expert parallelism: routed rows travel to the devices holding their experts and back; the
expert weights never move.

The stacked (E, ...) expert weights are split in E over the mesh's ``expert`` axis of size X:
device x holds experts ``[x e, (x + 1) e)`` (``e = E / X`` local experts; the S shared ones
sit on the first devices). Each device slice (one data-parallel replica, see sharding.py) routes
its own N tokens, then:

1. **Send.** Its N k assignments are grouped by destination device. Each destination takes at
   most ``cap`` rows from one slice (:func:`device_capacity`), earlier tokens first (tokens are
   position-major, so a token's drop never depends on later tokens); the rest drop and are
   counted as ``dropped_fraction`` reports. Within a destination's chunk the kept rows are
   ordered by local expert.
2. **Exchange** (inside the step's ``shard_map``, replicas.py). On GPUs one
   ``ragged_all_to_all`` moves exactly the kept rows (the bytes the layout needs, whatever
   ``cap``); XLA:CPU has no ragged kind, so there an ``all_to_all`` moves a padded
   (X, cap, C) buffer. Both land in the same (X, cap, C) buffer on the receiver, chunk j
   from slice j. Nothing of the shared experts' rows travels.
3. **Compute.** Each device runs its e experts on the rows it received: through the grouped
   GEMM (ragged_gemm.py, ``grouped``: the empty slots in no group, skipped) or, per source
   slice, as tiles (grouped.py: every slot).
4. **Return** the same way back; gates applied where the tokens are.

The shared experts run on every device on its own tokens; their weights are picked from the
sharded stack with a one-hot contraction (an all-reduce of S experts' weights, never a gather
of all E).

Capacity semantics (not capacity_dispatch's per-expert slots): per (slice, destination
device), ``cap = ceil(capacity_factor * share * N k * r / R)`` with r the most routed experts
one device holds, R the routed experts, ``share = max(1/sqrt(r), DEVICE_SHARE)``. When the
config cannot drop on one device (``capacity(N) == N``) the mesh cannot drop either (cap =
the most rows a slice can send one device). :func:`expert_parallel_dispatch` with
``mesh=None, groups=X`` computes the same numbers on one device (the tests' reference; the
CPU tests also run the ragged path against an emulation of the collective's documented
semantics).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .activations import relu_squared
from .grouped import permuted_rows, pick_tile, sort_assignments, tile_layout, tiled_matmul
from .expert_mlps import gated_sum, shared_experts
from .ragged_gemm import experts, shared_experts_grouped
from .shared_gemm import shared_mlp

f32 = jnp.float32
# A device pools the loads of its r routed experts; their sum varies about sqrt(r) times less
# (relatively) than one expert's, so its slack is capacity_factor x max(1/sqrt(r),
# DEVICE_SHARE) over its mean load: one expert a device keeps the config's slack, 4 or more
# get 0.525 of it (the default 2.0 -> 1.05). The floor was chosen for bytes when the padded
# buffer travelled (X x cap rows, 1.05 x (E/X) / (R/X) the N k routed rows); the ragged
# exchange sends only the rows and the grouped GEMM computes only those, but the receive
# buffers still hold X x cap rows (memory; the tiles compute every slot).
# It drops more than one device's capacity does (benchmarks/NOTES.md, issue 23.4);
# --capacity_factor raises both.
DEVICE_SHARE = 0.525


def routed_per_device(E: int, S: int, X: int) -> int:
    """The most routed experts one device holds (the first devices also hold the S shared)."""
    return min(E // X, E - S)


def device_capacity(n_tokens: int, c, X: int) -> int:
    """Rows one slice of ``n_tokens`` tokens may send one of X devices (config ``c``)."""
    E, S, k = c.n_total_experts, c.n_shared, c.n_activated_experts
    r = routed_per_device(E, S, X)
    most = n_tokens * min(k, r)  # each token sends one device at most min(k, r) rows
    if c.capacity(n_tokens) >= n_tokens:  # cannot drop on one device: nor here
        return most
    factor = c.capacity_factor * max(DEVICE_SHARE, 1 / math.sqrt(r))
    return max(1, min(most, math.ceil(factor * n_tokens * k * r / (E - S))))


def received_rows(n_tokens: int, c, X: int) -> float:
    """Rows the busiest device receives from X slices of ``n_tokens`` tokens each when routing
    is uniform over the routed experts: what its grouped GEMM computes (of its X cap slots)."""
    R = c.n_total_experts - c.n_shared
    return X * n_tokens * c.n_activated_experts * routed_per_device(c.n_total_experts,
                                                                   c.n_shared, X) / R


def shared_weights(w, S: int):
    """The S shared experts' weights out of the E-sharded stack: a one-hot contraction over E
    (each device adds the experts it holds: an all-reduce of S experts, not a gather of E)."""
    E = w[0].shape[0]
    pick_SE = jnp.eye(S, E, dtype=w[0].dtype)
    return [jnp.einsum("se,e...->s...", pick_SE, a) for a in w]


class SendLayout(NamedTuple):
    """Where one slice's N k assignments go (A = N k; X devices of e experts, cap slots each).
    The sorted order groups the assignments by destination device, kept rows first and by
    local expert within a device, token order inside; device x's chunk of it starts at
    ``starts_X[x]`` and its first ``sizes_X[x]`` rows are the ones sent."""
    dev_A: jax.Array        # destination device of each assignment
    slot_A: jax.Array       # its row in that device's chunk
    kept_A: jax.Array       # within the device's capacity
    token_XM: jax.Array     # the token in each (device, slot) of the padded buffer
    filled_XM: jax.Array    # whether that slot holds a row
    counts_Xe: jax.Array    # kept rows per (device, local expert)
    order_A: jax.Array      # assignment at each sorted position
    starts_X: jax.Array     # each device's chunk in the sorted order
    sizes_X: jax.Array      # rows sent to each device


def send_layout(top_idx_NK, S: int, e: int, X: int, cap: int) -> SendLayout:
    """The :class:`SendLayout` of one slice's routed assignments (global expert = id + S)."""
    N, K = top_idx_NK.shape
    A = N * K
    g_A = top_idx_NK.reshape(-1) + S                   # global expert of each assignment
    dev_A, lid_A = g_A // e, g_A % e
    arange_A = jnp.arange(A, dtype=jnp.int32)
    by_dev_A = jnp.argsort(dev_A, stable=True)         # token order within a device
    rank_A = jnp.zeros(A, jnp.int32).at[by_dev_A].set(arange_A)
    counts_X = jnp.zeros(X, jnp.int32).at[dev_A].add(1)
    starts_X = jnp.cumsum(counts_X) - counts_X
    kept_A = rank_A - starts_X[dev_A] < cap            # the first cap rows in token order
    # kept rows of a device grouped by local expert; dropped ones after them
    key_A = dev_A * (e + 1) + jnp.where(kept_A, lid_A, e)
    order_A = jnp.argsort(key_A, stable=True)
    slot_A = jnp.zeros(A, jnp.int32).at[order_A].set(arange_A) - starts_X[dev_A]
    slot_M = jnp.arange(cap)
    sizes_X = jnp.minimum(counts_X, cap)
    filled_XM = slot_M[None] < sizes_X[:, None]
    token_XM = order_A[jnp.clip(starts_X[:, None] + slot_M[None], 0, A - 1)] // K
    counts_Xe = jnp.zeros((X, e), jnp.int32).at[dev_A, lid_A].add(kept_A.astype(jnp.int32))
    return SendLayout(dev_A, slot_A, kept_A, token_XM, filled_XM, counts_Xe, order_A,
                      starts_X, sizes_X)


def local_experts(x_MC, counts_e, w1_eHC, b1_eH, w2_eCH, b2_eC):
    """One device's e experts on the M rows one slice sent it (grouped by expert, the empty
    slots last) as tiles (grouped.py). Rows of the empty slots come back as garbage: unread."""
    M, C = x_MC.shape
    e = w1_eHC.shape[0]
    counts = jnp.concatenate([counts_e, (M - counts_e.sum())[None]])  # last group: empty slots
    tile = pick_tile(M, e + 1)
    lay = tile_layout(counts, M, tile)
    x_PC = jnp.where((lay.src_P >= 0)[:, None], x_MC[jnp.maximum(lay.src_P, 0)], 0)
    x_nTC = x_PC.reshape(-1, tile, C).astype(x_MC.dtype)
    g_n = jnp.minimum(lay.tile_expert_n, e - 1)        # empty tiles: any expert, unread
    h_nTH = relu_squared(tiled_matmul(x_nTC, w1_eHC, g_n) + b1_eH[g_n][:, None])
    y_nTC = tiled_matmul(h_nTH, w2_eCH, g_n) + b2_eC[g_n][:, None]
    return y_nTC.reshape(-1, C)[lay.dest_A]


AXIS = "expert"


@jax.custom_vjp
def _psum_exact(a):
    """``psum`` over the expert axis whose gradient is the ``psum`` of the devices'
    cotangents (the step's shard_map runs without replication typing, which would otherwise
    decide psum's transpose)."""
    return jax.lax.psum(a, AXIS)


_psum_exact.defvjp(lambda a: (_psum_exact(a), None), lambda _, g: (jax.lax.psum(g, AXIS),))


def local_shared_weights(w_local, S: int):
    """The S shared experts' weights on every device, from the devices holding them (the
    first ones): each device contracts its own experts with its rows of a one-hot (S, E) and
    the expert axis sums them, an all-reduce of S experts' weights, never a gather of all E."""
    e = w_local[0].shape[0]
    X = jax.lax.axis_size(AXIS)
    pick_Se = jax.lax.dynamic_slice_in_dim(jnp.eye(S, X * e, dtype=w_local[0].dtype),
                                           jax.lax.axis_index(AXIS) * e, e, axis=1)
    return [_psum_exact(jnp.einsum("se,e...->s...", pick_Se, a)) for a in w_local]


def _all_to_all(a):
    return jax.lax.all_to_all(a, AXIS, 0, 0, tiled=True)


def padded_rows(x_NC, lay: SendLayout):
    """The slice's kept rows as an (X, cap, C) buffer, chunk x for device x, zeros after."""
    return jnp.where(lay.filled_XM[..., None], x_NC[lay.token_XM], 0).astype(x_NC.dtype)


def rows_back(y_XMC, lay: SendLayout):
    """Each assignment's row out of an (X, cap, C) buffer laid out as :func:`padded_rows`."""
    return y_XMC[lay.dev_A, jnp.minimum(lay.slot_A, y_XMC.shape[1] - 1)]


def send_rows(x_NC, lay: SendLayout, cap: int, ragged: bool):
    """Each device's rows to it: (X, cap, C) on the receiver, chunk j from slice j (its
    first ``sizes`` rows filled, zeros after). ``ragged``: only those rows travel
    (``ragged_all_to_all`` of the sorted rows; GPUs); else the padded (X, cap, C) buffer
    (``all_to_all``; XLA:CPU has no ragged kind). Both give the same buffer."""
    X, C = lay.sizes_X.shape[0], x_NC.shape[1]
    if not ragged:
        return _all_to_all(padded_rows(x_NC, lay))
    K = lay.order_A.shape[0] // x_NC.shape[0]
    me = jax.lax.axis_index(AXIS)
    out = jax.lax.ragged_all_to_all(
        x_NC[lay.order_A // K], jnp.zeros((X * cap, C), x_NC.dtype), lay.starts_X, lay.sizes_X,
        jnp.full((X,), me * cap, jnp.int32), _all_to_all(lay.sizes_X), axis_name=AXIS)
    return out.reshape(X, cap, C)


def return_rows(y_XMC, lay: SendLayout, cap: int, ragged: bool):
    """The rows :func:`send_rows` delivered, computed, back to their slices: (A, C) in
    assignment order (a dropped assignment's row is zero or garbage: the caller masks it)."""
    X, _, C = y_XMC.shape
    if not ragged:
        return rows_back(_all_to_all(y_XMC), lay)
    A = lay.order_A.shape[0]
    back_AC = jax.lax.ragged_all_to_all(
        y_XMC.reshape(X * cap, C), jnp.zeros((A, C), y_XMC.dtype),
        jnp.arange(X, dtype=jnp.int32) * cap, _all_to_all(lay.sizes_X),
        _all_to_all(lay.starts_X), lay.sizes_X, axis_name=AXIS)
    # each assignment's place in the sorted order: order_A's inverse
    return permuted_rows(back_AC, lay.starts_X[lay.dev_A] + lay.slot_A, lay.order_A)


def routed_dispatch(x_NC, top_idx_NK, top_gates_NK, w, S: int, X: int, cap: int):
    """The routed experts of one slice as X devices would run them, on one device (all E
    experts' weights): (y_NC fp32, dropped assignments). The reference of the exchange."""
    e = w[0].shape[0] // X
    lay = send_layout(top_idx_NK, S, e, X, cap)
    w_X = [a.reshape(X, e, *a.shape[1:]) for a in w]  # device x's experts (E split in X)
    y_XMC = jax.vmap(local_experts)(padded_rows(x_NC, lay), lay.counts_Xe, *w_X)
    return (gated_sum(rows_back(y_XMC, lay), lay.kept_A, top_gates_NK),
            jnp.sum(~lay.kept_A).astype(f32))


RECEIVED_SCOPE = "received_rows"


def received_experts(recv_XMC, counts_Xe, w_local):
    """A device's e experts on every row it received, through the grouped GEMM (tokamax's
    and ours, ragged_gemm.py: each expert's weights read once a GEMM, not once a tile): each
    row one assignment of gate 1. The empty slots sort after every expert's rows, in no
    group, so the kernels skip them: a device computes the rows it received, not its X cap
    slots (their outputs are zeros, and never read)."""
    X, M, C = recv_XMC.shape
    e = counts_Xe.shape[1]
    ends_Xe = jnp.cumsum(counts_Xe, axis=1)
    slot_XM = jnp.arange(M)[None, :, None]
    lid_R = jnp.sum(slot_XM >= ends_Xe[:, None, :], axis=-1).reshape(-1)   # e: an empty slot
    filled_R = lid_R < e
    expert_R1 = jnp.where(filled_R, lid_R, 0)[:, None].astype(jnp.int32)
    gates_R1 = filled_R[:, None].astype(f32)
    s = sort_assignments(lid_R[:, None], e + 1)                            # empty slots last
    s = s._replace(counts_R=s.counts_R[:e])
    with jax.named_scope(RECEIVED_SCOPE):  # the plan charges these kernels their rows
        y_RC = experts(recv_XMC.reshape(X * M, C), gates_R1, expert_R1, s, w_local,
                       past_groups=True)
    return y_RC.astype(recv_XMC.dtype).reshape(X, M, C)


def exchanged_dispatch(x_NC, top_idx_NK, top_gates_NK, w_local, S: int, cap: int,
                       ragged: bool, grouped: bool = False):
    """The routed experts of this device's slice, inside the step's shard_map: rows out to
    the devices holding their experts, each device's e experts on what it received from every
    slice (``grouped``: the grouped GEMM; else per slice the same tiles as the reference),
    rows back."""
    X, e = jax.lax.axis_size(AXIS), w_local[0].shape[0]
    lay = send_layout(top_idx_NK, S, e, X, cap)
    recv_XMC = send_rows(x_NC, lay, cap, ragged)
    counts_Xe = _all_to_all(lay.counts_Xe)          # per source slice, per local expert
    if grouped:
        y_XMC = received_experts(recv_XMC, counts_Xe, w_local)
    else:
        y_XMC = jax.vmap(local_experts, in_axes=(0, 0) + (None,) * 4)(recv_XMC, counts_Xe,
                                                                       *w_local)
    y_AC = return_rows(y_XMC, lay, cap, ragged)
    return gated_sum(y_AC, lay.kept_A, top_gates_NK), jnp.sum(~lay.kept_A).astype(f32)


def ragged_exchange(mesh) -> bool:
    """Whether the rows travel by ``ragged_all_to_all`` (every platform but XLA:CPU)."""
    return mesh.devices.flat[0].platform != "cpu"


def expert_parallel_dispatch(x_NC, r, w, c, mesh=None, groups: int | None = None,
                             grouped: bool = False, shared_dense: bool = False):
    """Shared and routed experts of one slice: (y_NC fp32, dropped assignments).
    Inside the step's shard_map ``w`` holds this device's E/X experts and the rows travel.
    With all E experts' weights (``mesh=None, groups=X``, or a model replicated to sample
    from) the same numbers on one device, no exchange: the reference the tests compare the
    mesh with. ``grouped``: each device's experts through the grouped GEMM (the tokamax
    dispatch's kernels) rather than tiles: the same numbers up to the order of fp32 sums;
    ``shared_dense`` with it: the shared experts as one dense MLP (``shared_gemm.py``)."""
    S, N = c.n_shared, x_NC.shape[0]
    X = groups or mesh.shape[AXIS]
    cap = device_capacity(N, c, X)
    if w[0].shape[0] == c.n_total_experts:
        y_NC = shared_experts(x_NC, r.gates_NE[:, :S], shared_weights(w, S))
        y_r, dropped = routed_dispatch(x_NC, r.top_idx_NK, r.top_gates_NK, w, S, X, cap)
    else:
        shared = (_shared_dense if grouped and shared_dense else
                  shared_experts_grouped if grouped else shared_experts)
        y_NC = shared(x_NC, r.gates_NE[:, :S], local_shared_weights(w, S))
        y_r, dropped = exchanged_dispatch(x_NC, r.top_idx_NK, r.top_gates_NK, w, S, cap,
                                          ragged_exchange(mesh), grouped)
    return y_NC + y_r, dropped


def _shared_dense(x_NC, gates_NS, w):
    if gates_NS.shape[1] == 0:
        return jnp.zeros(x_NC.shape, jnp.float32)
    return shared_mlp(x_NC, gates_NS, *w)
