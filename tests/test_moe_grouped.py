"""The JAX MoE's grouped back ends: the padded tiles (grouped_dispatch) against ragged_dot for
any tile size with uneven and empty experts, the tile layout and pick_tile's padding bound,
and tokamax's grouped GEMM against the shared MLP plus tiles in fp32 and bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe import MoeGPTConfig
from nanomoe_jax.grouped import (every_token_assignments, padded_rows, permuted_rows, pick_tile,
                                 tile_layout)
from nanomoe_jax.expert_mlps import shared_experts
from nanomoe_jax.moe import (grouped_dispatch, ragged_dispatch, route, sort_assignments,
                             tokamax_dispatch)
from nanomoe_jax.ragged_gemm import unavailable_reason

# tokamax's grouped GEMM where it imports (its XLA reference on CPU; the Triton kernels
# themselves, interpreted, in tests/test_ragged_gemm.py)
TOKAMAX = () if unavailable_reason() else ("tokamax",)


def grouped_case(seed=7, N=45, C=16, H=24, R=7, K=3):
    """Routing of N tokens over R routed experts, expert 0 never chosen, and random weights."""
    k = jax.random.split(jax.random.key(seed), 6)
    config = MoeGPTConfig(n_layer=1, n_embd=C, n_head=2, block_size=64, vocab_size=64,
                          n_experts=R + 1, n_shared_experts=1, n_activated_experts=K)
    logits_NE = jax.random.normal(k[0], (N, R + 1)).at[:, 1].add(-100.0)  # routed expert 0
    r = route(logits_NE, config)
    w = [jax.random.normal(k[1], (R, H, C)) * 0.2, jax.random.normal(k[2], (R, H)) * 0.1,
         jax.random.normal(k[3], (R, C, H)) * 0.2, jax.random.normal(k[4], (R, C)) * 0.1]
    return jax.random.normal(k[5], (N, C)), r, w


@pytest.mark.parametrize("tile", [1, 4, 16, 64])
def test_grouped_tiles_equal_ragged(tile):
    """Small tiles (several per expert, partly filled, an expert with no tokens) give the
    numbers and gradients of ragged_dot."""
    x_NC, r, w = grouped_case()
    assert int(jnp.sum(r.top_idx_NK == 0)) == 0 and int(jnp.sum(r.top_idx_NK == 1)) > 16

    def loss(dispatch, x_NC, w):
        return jnp.sum(jnp.sin(dispatch(x_NC, r, w)))

    grouped = jax.jit(jax.value_and_grad(lambda x, w: loss(
        lambda *a: grouped_dispatch(*a, tile=tile), x, w), argnums=(0, 1)))
    ragged = jax.jit(jax.value_and_grad(lambda x, w: loss(ragged_dispatch, x, w), argnums=(0, 1)))
    (v, g), (v_ref, g_ref) = grouped(x_NC, w), ragged(x_NC, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    # the unused expert gets exactly no gradient, not the padding's
    assert float(jnp.abs(g[1][0][0]).max()) == 0.0 and float(jnp.abs(g[1][3][0]).max()) == 0.0


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_tile_layout_puts_each_row_in_a_tile_of_its_expert(tile):
    _, r, _ = grouped_case()
    N, K = r.top_idx_NK.shape
    R, A = 7, N * K
    s = sort_assignments(r.top_idx_NK, R)
    lay = tile_layout(s.counts_R, A, tile)
    P = padded_rows(A, R, tile)
    assert lay.src_P.shape == (P,) and P <= A + R * (tile - 1) and P % tile == 0
    dest_A, src_P = np.asarray(lay.dest_A), np.asarray(lay.src_P)
    tile_expert = np.asarray(lay.tile_expert_n)
    expert_sorted = np.asarray(s.expert_sorted_A)
    assert len(set(dest_A)) == A                                   # no two rows share a slot
    np.testing.assert_array_equal(src_P[dest_A], np.arange(A))     # and the inverse agrees
    assert (src_P >= 0).sum() == A
    np.testing.assert_array_equal(tile_expert[dest_A // tile], expert_sorted)
    assert np.all(np.diff(tile_expert) >= 0)                       # experts in order


def test_pick_tile_bounds_the_padding():
    for A, R in [(32768, 3), (131072, 60), (1 << 20, 64), (4096, 31)]:
        tile = pick_tile(A, R)
        assert 64 <= tile <= 512 and tile & (tile - 1) == 0
        assert R * (tile - 1) <= A / 16 or tile == 64
    assert pick_tile(32768, 3) == 512 and pick_tile(131072, 60) == 128


def shared_plus(dispatch, S):
    """The shared MLP plus a routed-only back end: what tokamax's dispatch does in one."""
    def f(x, r, p, dtype):
        w = [a.astype(dtype) for a in p]
        x = x.astype(dtype)
        return (shared_experts(x, r.gates_NE[:, :S], [a[:S] for a in w])
                + dispatch(x, r, [a[S:] for a in w]))
    return f


def tokamax_case(shared_dense=False):
    x_NC, r, w = grouped_case()
    params = [jnp.concatenate([a[:1] * 3.0, a]) for a in w]  # a shared expert in front
    fns = {"tokamax": lambda x, r, p, dtype: tokamax_dispatch(x.astype(dtype), r, p, 1,
                                                              shared_dense),
           "grouped": shared_plus(functools.partial(grouped_dispatch, tile=4), 1),
           "ragged": shared_plus(ragged_dispatch, 1)}
    return x_NC, r, params, fns


def layer_grads(fn, x_NC, r, params, dtype):
    def loss(x, p):
        return jnp.sum(jnp.sin(fn(x, r, p, dtype)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x_NC, params)


@pytest.mark.skipif(not TOKAMAX, reason="tokamax is not installed")
@pytest.mark.parametrize("shared_dense", [False, True], ids=["shared_grouped", "shared_dense"])
def test_tokamax_equals_grouped_with_uneven_and_empty_experts(shared_dense):
    """tokamax's dispatch (shared and routed experts as one set of groups, or the shared one
    as its own dense MLP) against the shared MLP plus the padded tiles, and plus ragged_dot:
    output and gradients of the input and of every expert tensor in fp32 to 1e-5. Routed
    expert 0 gets no token, expert 1 more than a third of them."""
    x_NC, r, params, fns = tokamax_case(shared_dense)
    v, g = layer_grads(fns["tokamax"], x_NC, r, params, jnp.float32)
    for name in ("grouped", "ragged"):
        v_ref, g_ref = layer_grads(fns[name], x_NC, r, params, jnp.float32)
        np.testing.assert_allclose(v, v_ref, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            scale = float(jnp.abs(b).max())
            assert scale > 0
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
    # the shared expert learns; the unused routed expert gets exactly no gradient
    for p in g[1]:
        assert float(jnp.abs(p[0]).max()) > 0 and float(jnp.abs(p[1 + 0]).max()) == 0.0


@pytest.mark.skipif(not TOKAMAX, reason="tokamax is not installed")
def test_tokamax_in_bf16_within_its_rounding():
    """bf16 against fp32: the output and every gradient to 5e-2 in norm (the shared expert's
    weights are 3x the routed ones': the tiles in bf16 are 4e-2 off too), and nowhere more
    than twice as far off as the shared MLP plus tiles run in bf16 (the two round at
    different points: the shared experts' outputs here, their gated hidden units there)."""
    x_NC, r, params, fns = tokamax_case()
    want = fns["grouped"](x_NC, r, params, jnp.float32)
    _, g_want = layer_grads(fns["grouped"], x_NC, r, params, jnp.float32)
    got = fns["tokamax"](x_NC, r, params, jnp.bfloat16)
    _, g_got = layer_grads(fns["tokamax"], x_NC, r, params, jnp.bfloat16)
    base = fns["grouped"](x_NC, r, params, jnp.bfloat16)
    _, g_base = layer_grads(fns["grouped"], x_NC, r, params, jnp.bfloat16)
    for a, b, c in zip(*(map(lambda t: np.asarray(t, np.float32), jax.tree.leaves(t))
                         for t in ((got, g_got), (want, g_want), (base, g_base)))):
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)
        assert np.abs(a - b).max() <= 2 * np.abs(c - b).max() + 1e-3 * np.abs(b).max()


def test_permuted_rows_gradient_is_a_gather():
    """Rows put back in assignment order by an inverse pair of permutations: the forward is
    the plain gather, and the gradient is the same as the gather's transpose, computed as a
    gather (no scatter in the backward program)."""
    order_A = jax.random.permutation(jax.random.key(0), 40)
    pos_A = jnp.zeros(40, jnp.int32).at[order_A].set(jnp.arange(40, dtype=jnp.int32))
    rows = jax.random.normal(jax.random.key(1), (40, 8))
    g = jax.random.normal(jax.random.key(2), (40, 8))

    def loss(f):
        return lambda r: jnp.sum(f(r) * g)

    np.testing.assert_array_equal(permuted_rows(rows, pos_A, order_A), rows[pos_A])
    got = jax.grad(loss(lambda r: permuted_rows(r, pos_A, order_A)))(rows)
    np.testing.assert_array_equal(got, jax.grad(loss(lambda r: r[pos_A]))(rows))
    hlo = jax.jit(jax.grad(loss(lambda r: permuted_rows(r, pos_A, order_A)))).lower(
        rows).as_text()
    assert "scatter" not in hlo and "gather" in hlo


@pytest.mark.parametrize("N,S", [(7, 1), (9, 4)])
def test_every_token_assignments_are_the_sort_of_the_shared_experts(N, S):
    """The shared experts' sorted layout built from the shapes equals sorting them."""
    want = sort_assignments(jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (N, S)), S)
    got = every_token_assignments(N, S)
    for name, a, b in zip(want._fields, got, want):
        np.testing.assert_array_equal(a, b, err_msg=name)
