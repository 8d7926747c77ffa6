"""The row-gathering grouped GEMMs (nanomoe_jax/gather_gemm.py): their Triton kernels in
Pallas interpret mode against the XLA path (rows gathered, then jax.lax.ragged_dot), with
uneven groups, an empty group and rows after the last group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import gather_gemm as gg

COUNTS = jnp.array([30, 0, 41, 25], jnp.int32)  # group 1 empty
T, K, N = 20, 64, 128
P = int(COUNTS.sum()) + 7  # 7 rows in no group


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setattr(gg, "INTERPRET", True)


def tables(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return (jax.random.normal(k[0], (T, K)), jax.random.randint(k[1], (P,), 0, T),
            jax.random.normal(k[2], (4, K, N)), jax.random.normal(k[3], (4, N)),
            jax.random.normal(k[4], (P, 64)))


def relu2(a):
    return jnp.square(jnp.maximum(a, 0.0))


@pytest.mark.parametrize("w_nk", [False, True])
def test_gather_dot_kernel_equals_gathered_rows_times_weights(interpreted, w_nk):
    x, idx, w, b, _ = tables()
    stored = w.mT if w_nk else w  # (G, N, K): a parameter as the layer stores it
    want = gg.gather_dot(x, idx, stored, COUNTS, jnp.float32, b, relu2, w_nk=w_nk)
    got = gg.gather_dot(x, idx, stored, COUNTS, jnp.float32, b, relu2, w_nk=w_nk,
                        use_kernel=True)
    n = int(COUNTS.sum())  # rows after the last group are not written: only the groups'
    ends = np.cumsum(np.asarray(COUNTS))
    ref = relu2(jnp.einsum("pk,pkn->pn", x[idx[:n]], w[np.searchsorted(ends, np.arange(n),
                                                                         side="right")])
                + b[np.searchsorted(ends, np.arange(n), side="right")])
    np.testing.assert_allclose(want[:n], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(got[:n], want[:n], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("gathered", ["a", "b"])
def test_gather_wgrad_kernel_per_group_with_an_empty_one(interpreted, gathered):
    x, idx, _, _, a = tables(1)
    args = (a, x) if gathered == "b" else (x, a)
    want, want_sums = gg.gather_wgrad(*args, idx, COUNTS, gathered, colsum=True)
    got, sums = gg.gather_wgrad(*args, idx, COUNTS, gathered, colsum=True, use_kernel=True)
    lhs = args[0][idx] if gathered == "a" else args[0]
    rhs = args[1][idx] if gathered == "b" else args[1]
    lo = 0
    for g, c in enumerate(np.asarray(COUNTS)):
        ref = lhs[lo:lo + c].T @ rhs[lo:lo + c]
        np.testing.assert_allclose(want[g], ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(want_sums[g], lhs[lo:lo + c].sum(0), rtol=1e-5, atol=1e-4)
        lo += c
    assert float(jnp.abs(got[1]).max()) == 0.0 and float(jnp.abs(sums[1]).max()) == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gathered", ["a", "b"])
def test_gather_wgrad_scales_the_sorted_rows_as_it_loads_them(interpreted, gathered):
    """W2's gradient takes the gates on h inside the kernel: the same numbers as a gated copy
    of h written first (rounded to its dtype the same way)."""
    x, idx, _, _, a = tables(2)
    x, a = x.astype(jnp.bfloat16), a.astype(jnp.bfloat16)
    scale = jax.random.uniform(jax.random.key(3), (P,), minval=0.1, maxval=1.0)
    args = (a, x) if gathered == "b" else (x, a)
    dense = 0 if gathered == "b" else 1
    copied = list(args)
    copied[dense] = (args[dense].astype(jnp.float32) * scale[:, None]).astype(jnp.bfloat16)
    want = gg.gather_wgrad(*copied, idx, COUNTS, gathered)
    got_xla, sums_xla = gg.gather_wgrad(*args, idx, COUNTS, gathered, colsum=True, scale_P=scale)
    got, sums = gg.gather_wgrad(*args, idx, COUNTS, gathered, colsum=True, scale_P=scale,
                                use_kernel=True)
    assert float(jnp.abs(want).max()) > 1.0
    np.testing.assert_array_equal(got_xla, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # a's sums, each row times its scale (b2's gradient: the gated output-gradient rows); a
    # sorted a is summed as the GEMM reads it, rounded after scaling
    a_P = (args[0][idx] if gathered == "a" else copied[0]).astype(jnp.float32)
    a_P = a_P * scale[:, None] if gathered == "a" else a_P
    lo = 0
    for g, c in enumerate(np.asarray(COUNTS)):
        np.testing.assert_allclose(sums_xla[g], a_P[lo:lo + c].sum(0), rtol=1e-5, atol=1e-4)
        lo += c
    assert float(jnp.abs(sums_xla).max()) > 1.0
    np.testing.assert_allclose(sums, sums_xla, rtol=1e-5, atol=1e-4)


def test_relu2_grad_epilogue_equals_the_gemm_then_the_elementwise_tail(interpreted):
    """The MoE backward's first GEMM with relu^2's gated gradient and the gates' gradient in
    its epilogue: the kernel against the XLA path against the two steps written out (with an
    empty group, and rows after the last group, which neither writes)."""
    x, idx, w, _, _ = tables(4)
    h = jnp.square(jax.random.normal(jax.random.key(5), (P, N)))  # relu^2 outputs: >= 0
    gate = jax.random.uniform(jax.random.key(6), (P,), minval=0.1, maxval=1.0)
    n = int(COUNTS.sum())
    groups = np.searchsorted(np.cumsum(np.asarray(COUNTS)), np.arange(n), side="right")
    d = jnp.einsum("pk,pkn->pn", x[idx[:n]], w[groups])
    want_dv = gate[:n, None] * d * 2.0 * jnp.sqrt(h[:n])
    want_dg = jnp.sum(d * h[:n], axis=1)
    for use_kernel in (False, True):
        dv, parts = gg.gather_dot_relu2_grad(x, idx, w, COUNTS, h, gate, use_kernel=use_kernel)
        dg = gg.relu2_grad_rows(parts)
        assert dv.shape == (P, N) and dv.dtype == h.dtype
        np.testing.assert_allclose(dv[:n], want_dv, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want_dv).max()))
        np.testing.assert_allclose(dg[:n], want_dg, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want_dg).max()))


def test_gather_wgrad_rounds_only_its_result_to_the_out_dtype(interpreted):
    """``out_dtype=bf16`` (the MoE's weight gradients): the fp32 accumulation rounded once at
    the end, bit for bit, kernel and XLA; the column sums stay fp32."""
    x, idx, _, _, a = tables(7)
    for use_kernel in (False, True):
        full, sums = gg.gather_wgrad(a, x, idx, COUNTS, "b", colsum=True, use_kernel=use_kernel)
        low, low_sums = gg.gather_wgrad(a, x, idx, COUNTS, "b", colsum=True,
                                        use_kernel=use_kernel, out_dtype=jnp.bfloat16)
        assert low.dtype == jnp.bfloat16 and low_sums.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(low, np.float32),
                                      np.asarray(full.astype(jnp.bfloat16), np.float32))
        np.testing.assert_array_equal(low_sums, sums)
