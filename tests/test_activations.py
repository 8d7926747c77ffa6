"""gelu_tanh (nanomoe_jax/activations.py): value and gradient equal torch's
F.gelu(approximate="tanh") in fp32 and bf16 (where both compute in fp32), and
jax.nn.gelu(approximate=True) in fp32, on random inputs that reach both tails; relu_squared
equals torch's F.relu(x) ** 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanomoe_jax.activations import gelu_tanh


def inputs(dtype):
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal(0, 3, 4000), [-30.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0]])
    w = g.normal(0, 1, x.shape)
    return jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32)


# fp32: a few ulps of the O(1) values and gradients (the left tail's tiny gradient comes from
# 1 + tanh cancelling, so its error is absolute, not relative); bf16: one bf16 rounding.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 8e-3)],
                         ids=["fp32", "bf16"])
def test_equals_torch_and_jax(dtype, tol):
    x, w = inputs(dtype)
    loss = lambda f: lambda x: jnp.sum(f(x).astype(jnp.float32) * w)  # noqa: E731
    y, dx = jax.jit(gelu_tanh)(x), jax.jit(jax.grad(loss(gelu_tanh)))(x)
    assert y.dtype == dx.dtype == x.dtype
    ref = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
    y_ref, dx_ref = ref(x), jax.grad(loss(ref))(x)

    xt = torch.tensor(np.asarray(x, np.float32)).requires_grad_()
    xt_d = xt.to(torch.bfloat16) if dtype == jnp.bfloat16 else xt
    yt = F.gelu(xt_d, approximate="tanh")
    (yt.float() * torch.tensor(np.asarray(w))).sum().backward()

    def close(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

    if dtype == jnp.float32:  # jax.nn.gelu computes bf16 in bf16: less accurate than both
        close(y, y_ref)
        close(dx, dx_ref)
    close(y, yt.detach().float().numpy())
    close(dx, xt.grad.numpy())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_relu_squared_equals_torch(dtype):
    """relu(x)^2 and its gradient 2 relu(x) g, exactly as torch computes them (zero at and
    below 0, the experts' activation)."""
    from nanomoe_jax.activations import relu_squared

    x, w = inputs(dtype)
    y = jax.jit(relu_squared)(x)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(relu_squared(x).astype(jnp.float32) * w)))(x)
    assert y.dtype == dx.dtype == x.dtype
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    xt = torch.tensor(np.asarray(x, np.float32)).to(tdtype).requires_grad_()
    yt = F.relu(xt) ** 2
    (yt.float() * torch.tensor(np.asarray(w))).sum().backward()
    np.testing.assert_array_equal(np.asarray(y, np.float32), yt.detach().float().numpy())
    np.testing.assert_allclose(np.asarray(dx, np.float32), xt.grad.float().numpy(),
                               rtol=1e-6 if dtype == jnp.float32 else 8e-3, atol=0)
    assert np.all(np.asarray(dx, np.float32)[np.asarray(x, np.float32) <= 0] == 0)
