"""Expert parallelism: routed rows travel to the devices holding their experts and back; the
expert weights never move.

The stacked (E, ...) expert weights are split in E over the mesh's ``expert`` axis of size X:
device x holds experts ``[x e, (x + 1) e)`` (``e = E / X`` local experts; the S shared ones
sit on the first devices). Each device slice (one data-parallel replica, see sharding.py) routes
its own N tokens, then:

1. **Send.** Its N k assignments are grouped by destination device. Each destination takes at
   most ``cap`` rows from one slice (:func:`device_capacity`), earlier tokens first (tokens are
   position-major, so a token's drop never depends on later tokens); the rest drop and are
   counted as ``dropped_fraction`` reports. The kept rows fill a routed-only (X, cap, C)
   buffer, ordered by local expert within each destination's chunk.
2. **Exchange.** The buffer is constrained to be sharded on X over ``expert``: XLA moves it
   with one all-to-all (and the (X, e) row counts with a tiny one). Nothing of the shared
   experts' rows travels, unlike the (E, capacity, C) buffer this replaces.
3. **Compute.** Each device runs its e experts on the rows it received as a grouped matmul of
   tiles (nanomoe_jax/grouped.py): the rows plus at most a tile per expert.
4. **Return** by the reverse all-to-all; gates applied where the tokens are.

The shared experts run on every device on its own tokens; their weights are picked from the
sharded stack with a one-hot contraction (an all-reduce of S experts' weights, never a gather
of all E).

Capacity semantics (not capacity_dispatch's per-expert slots): per (slice, destination
device), ``cap = ceil(capacity_factor * share * N k * r / R)`` with r the most routed experts
one device holds, R the routed experts, ``share = max(1/sqrt(r), DEVICE_SHARE)``. When the
config cannot drop on one device (``capacity(N) == N``) the mesh cannot drop either (cap =
the most rows a slice can send one device). :func:`expert_parallel_dispatch` with
``mesh=None, groups=X`` computes the same numbers on one device (the tests' reference).

Sharding constraints, not ``shard_map``: the step vmaps the model over device slices, and a
``shard_map`` under that vmap sees the slice axis replicated (it would gather every slice's
tokens); ``ragged_all_to_all`` has no XLA:CPU lowering (benchmarks/NOTES.md, issue 23.4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from .activations import relu_squared
from .grouped import pick_tile, tile_layout, tiled_matmul
from .expert_mlps import shared_experts

f32 = jnp.float32
# A device pools the loads of its r routed experts; their sum varies about sqrt(r) times less
# (relatively) than one expert's, so its slack is capacity_factor x max(1/sqrt(r),
# DEVICE_SHARE) over its mean load: one expert a device keeps the config's slack, 4 or more
# get 0.525 of it (the default 2.0 -> 1.05). The floor is chosen for bytes: the all-to-alls
# carry X x cap rows, 1.05 x (E/X) / (R/X) the N k routed rows, which keeps MoeGPT-64 on
# expert=8 within 1.15x the ideal. It drops more than one device's capacity does
# (benchmarks/NOTES.md, issue 23.4); --capacity_factor raises both.
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


def shared_weights(w, S: int):
    """The S shared experts' weights out of the E-sharded stack: a one-hot contraction over E
    (each device adds the experts it holds: an all-reduce of S experts, not a gather of E)."""
    E = w[0].shape[0]
    pick_SE = jnp.eye(S, E, dtype=w[0].dtype)
    return [jnp.einsum("se,e...->s...", pick_SE, a) for a in w]


def send_layout(top_idx_NK, S: int, e: int, X: int, cap: int):
    """Where each assignment goes: (device_A, slot_A, kept_A, token_XM, filled_XM, counts_Xe).
    Within a device's chunk the kept rows are ordered by local expert, token order inside."""
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
    filled_XM = slot_M[None] < jnp.minimum(counts_X, cap)[:, None]
    token_XM = order_A[jnp.clip(starts_X[:, None] + slot_M[None], 0, A - 1)] // K
    counts_Xe = jnp.zeros((X, e), jnp.int32).at[dev_A, lid_A].add(kept_A.astype(jnp.int32))
    return dev_A, slot_A, kept_A, token_XM, filled_XM, counts_Xe


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


def _to_experts(a, mesh, back=False):
    """Chunk axis 0 from the slice's own device to the experts' devices (or back): a change
    of the sharded dimension, which XLA realises as an all-to-all."""
    if mesh is None:
        return a
    local = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P("expert", *(None,) * (a.ndim - 1)))
    first, then = (split, local) if back else (local, split)
    return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(a, first), then)


def routed_dispatch(x_NC, top_idx_NK, top_gates_NK, w, S: int, X: int, cap: int, mesh=None):
    """The routed experts of one slice: (y_NC fp32, dropped assignments)."""
    N, K = top_idx_NK.shape
    E, C = w[0].shape[0], x_NC.shape[1]
    e = E // X
    dev_A, slot_A, kept_A, token_XM, filled_XM, counts_Xe = send_layout(top_idx_NK, S, e, X, cap)
    x_XMC = jnp.where(filled_XM[..., None], x_NC[token_XM], 0).astype(x_NC.dtype)
    x_XMC, counts_Xe = _to_experts(x_XMC, mesh), _to_experts(counts_Xe, mesh)
    w_X = [a.reshape(X, e, *a.shape[1:]) for a in w]  # device x's experts (E split in X)
    y_XMC = _to_experts(jax.vmap(local_experts)(x_XMC, counts_Xe, *w_X), mesh, back=True)
    y_AC = y_XMC[dev_A, jnp.minimum(slot_A, cap - 1)].astype(f32)
    y_AC = jnp.where(kept_A[:, None], y_AC, 0.0)
    y_NC = jnp.einsum("nk,nkc->nc", top_gates_NK, y_AC.reshape(N, K, C))
    return y_NC, jnp.sum(~kept_A).astype(f32)


def expert_parallel_dispatch(x_NC, r, w, c, mesh=None, groups: int | None = None):
    """Shared and routed experts of one slice with the (E, ...) weights split over the mesh's
    ``expert`` axis: (y_NC fp32, dropped assignments). ``mesh=None, groups=X``: the same
    numbers on one device, no placement (the reference the tests compare the mesh with)."""
    S, N = c.n_shared, x_NC.shape[0]
    X = groups or mesh.shape["expert"]
    cap = device_capacity(N, c, X)
    y_NC = shared_experts(x_NC, r.gates_NE[:, :S], shared_weights(w, S))
    y_r, dropped = routed_dispatch(x_NC, r.top_idx_NK, r.top_gates_NK, w, S, X, cap, mesh)
    return y_NC + y_r, dropped
