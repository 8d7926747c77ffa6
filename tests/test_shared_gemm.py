"""The shared experts as one dense MLP with its own VJP (nanomoe_jax/shared_gemm.py) against
plain autodiff of the XLA MLP (expert_mlps.shared_experts): forward and the gradients of x,
the gates and every parameter, in fp32, in bf16, and through the Triton kernels in Pallas
interpret mode; and the relu^2-gradient kernel with a gate per expert's run of columns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import gather_gemm, ragged_gemm
from nanomoe_jax.expert_mlps import shared_experts
from nanomoe_jax.shared_gemm import shared_mlp


def case(S, N=24, C=64, H=128, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    a, b = 1.1 / C ** 0.5, 1.1 / H ** 0.5  # activations of order 1 at any width
    params = [jax.random.normal(k[0], (S, H, C)) * a, jax.random.normal(k[1], (S, H)) * 0.1,
              jax.random.normal(k[2], (S, C, H)) * b, jax.random.normal(k[3], (S, C)) * 0.1]
    gates = jax.random.uniform(k[4], (N, S), minval=0.05, maxval=1.0)
    return jax.random.normal(k[5], (N, C)), gates, params


def value_and_grads(fn, x, gates, params, dtype=jnp.float32):
    def loss(x, g, p):
        return jnp.sum(jnp.sin(fn(x.astype(dtype), g, p).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, gates, params)


def mlp(x, g, p):
    return shared_experts(x, g, [a.astype(x.dtype) for a in p])


def dense(x, g, p):
    return shared_mlp(x, g, *p)


def assert_close(got, want, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(b).max())
        assert scale > 0  # nothing compared is all zeros
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("S", [1, 2, 4])
def test_dense_shared_mlp_matches_autodiff_fp32(S):
    x, gates, params = case(S)
    (v, g), (v_ref, g_ref) = (value_and_grads(f, x, gates, params) for f in (dense, mlp))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5 * x.size ** 0.5)
    assert_close(g, g_ref, 1e-5)


def test_dense_shared_mlp_bf16_within_its_rounding():
    """bf16 against fp32: the loss and every gradient nowhere more than twice as far off as
    autodiff of the XLA MLP run in bf16 (x rounded to bf16 moves the loss, a sum of
    1536 sines, by 6 % in both), every gradient within 2e-2 in norm."""
    x, gates, params = case(2, seed=1)
    v, g = value_and_grads(dense, x, gates, params, jnp.bfloat16)
    v_ref, g_ref = value_and_grads(mlp, x, gates, params)
    v_bf16, g_bf16 = value_and_grads(mlp, x, gates, params, jnp.bfloat16)
    assert abs(float(v - v_ref)) <= 2 * abs(float(v_bf16 - v_ref)) + 1e-3 * abs(float(v_ref))
    for a, b, c in zip(*(map(lambda t: np.asarray(t, np.float32), jax.tree.leaves(t))
                         for t in (g, g_ref, g_bf16))):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
        assert np.abs(a - b).max() <= 2 * np.abs(c - b).max() + 1e-3 * np.abs(b).max()


def test_dense_shared_mlp_through_the_interpreted_kernels(monkeypatch):
    """The GPU path: gather_dot, the relu^2-gradient kernel with a gate per expert (H = 256:
    two column blocks a gate) and gather_wgrad, run by the Pallas interpreter."""
    monkeypatch.setattr(gather_gemm, "INTERPRET", True)
    monkeypatch.setattr(ragged_gemm, "implementation", lambda: "triton")
    traced = set()
    for name in ("_gather_dot_kernel", "_relu2_grad_kernel", "_wgrad_kernel"):
        kernel = getattr(gather_gemm, name)
        monkeypatch.setattr(gather_gemm, name,
                            lambda *a, _k=kernel, _n=name, **kw: (traced.add(_n), _k(*a, **kw))[1])
    x, gates, params = case(2, N=16, C=64, H=256, seed=2)
    v, g = value_and_grads(dense, x, gates, params)
    assert traced == {"_gather_dot_kernel", "_relu2_grad_kernel", "_wgrad_kernel"}
    monkeypatch.setattr(ragged_gemm, "implementation", lambda: "xla")
    v_ref, g_ref = value_and_grads(mlp, x, gates, params)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5 * x.size ** 0.5)
    assert_close(g, g_ref, 1e-5)


def test_relu2_grad_kernel_with_a_gate_per_expert(monkeypatch):
    """(P, S) gates, each over its expert's N / S columns: the kernel (two column blocks a
    gate) and the XLA path against the two steps written out; ``dg`` per expert."""
    monkeypatch.setattr(gather_gemm, "INTERPRET", True)
    P, K, N, S = 40, 64, 512, 2
    k = jax.random.split(jax.random.key(3), 4)
    x, w = jax.random.normal(k[0], (P, K)), jax.random.normal(k[1], (1, K, N))
    h = jnp.square(jax.random.normal(k[2], (P, N)))
    gate = jax.random.uniform(k[3], (P, S), minval=0.1, maxval=1.0)
    rows, counts = jnp.arange(P, dtype=jnp.int32), jnp.array([P], jnp.int32)
    d = x @ w[0]
    want_dv = jnp.repeat(gate, N // S, axis=1) * d * 2.0 * jnp.sqrt(h)
    want_dg = jnp.sum((d * h).reshape(P, S, -1), -1).T
    for use_kernel in (False, True):
        dv, parts = gather_gemm.gather_dot_relu2_grad(x, rows, w, counts, h, gate,
                                                      use_kernel=use_kernel)
        dg = gather_gemm.relu2_grad_rows(parts, S)
        np.testing.assert_allclose(dv, want_dv, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want_dv).max()))
        np.testing.assert_allclose(dg, want_dg, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want_dg).max()))
