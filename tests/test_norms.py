"""RMSNorm and LayerNorm with their own backward (nanomoe_jax/norms.py): values and
gradients (input, scale, bias) equal torch's F.rms_norm / F.layer_norm and Flax's
nnx.RMSNorm / nnx.LayerNorm in fp32, on random inputs, weights and upstream gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from helpers import rel_err
from nanomoe_jax import norms

EPS = 1e-5


def data(seed=0, shape=(3, 10, 48)):
    g = np.random.default_rng(seed)
    x = g.normal(0.7, 2.0, shape).astype(np.float32)     # a mean away from 0 on purpose
    w = g.normal(1.0, 0.5, shape[-1:]).astype(np.float32)
    b = g.normal(0.0, 0.5, shape[-1:]).astype(np.float32)
    up = g.normal(0.0, 1.0, shape).astype(np.float32)    # the gradient flowing in
    return x, w, b, up


def torch_grads(kind, x, w, b, up):
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    if kind == "rms":
        y = F.rms_norm(xt, (x.shape[-1],), wt, EPS)
    else:
        y = F.layer_norm(xt, (x.shape[-1],), wt, bt, EPS)
    (y * torch.tensor(up)).sum().backward()
    grads = (xt.grad, wt.grad) + ((bt.grad,) if kind == "ln" else ())
    return y.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_equal_torch_and_flax(kind):
    x, w, b, up = data()
    mine = norms.RMSNorm if kind == "rms" else norms.LayerNorm
    flax_cls = nnx.RMSNorm if kind == "rms" else nnx.LayerNorm
    outs = {}
    for name, cls in (("mine", mine), ("flax", flax_cls)):
        m = cls(x.shape[-1], epsilon=EPS, dtype=jnp.float32, rngs=nnx.Rngs(0))
        m.scale[...] = jnp.asarray(w)
        if kind == "ln":
            m.bias[...] = jnp.asarray(b)
        graphdef, params = nnx.split(m)

        def loss(p, x):
            return jnp.sum(nnx.merge(graphdef, p)(x) * up)
        y = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jnp.asarray(x))
        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
        grads = [gx, gp["scale"][...]] + ([gp["bias"][...]] if kind == "ln" else [])
        outs[name] = (y, grads)
    y_t, grads_t = torch_grads(kind, x, w, b, up)
    y, grads = outs["mine"]
    assert isinstance(nnx.merge(*nnx.split(mine(8, rngs=nnx.Rngs(0)))), flax_cls)
    assert rel_err(y, y_t) <= 1e-6 and rel_err(y, outs["flax"][0]) <= 1e-6
    for a, t, f, name in zip(grads, grads_t, outs["flax"][1], ("x", "scale", "bias")):
        assert rel_err(a, t) <= 1e-5, name
        assert rel_err(a, f) <= 1e-5, name
