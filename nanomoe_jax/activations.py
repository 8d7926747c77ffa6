"""GPT-2's tanh GELU and the experts' relu^2, each with a one-pass backward.

``jax.nn.gelu(x, approximate=True)`` under autodiff saves ``tanh(...)`` beside ``x`` and
spends two more elementwise passes on the backward; here only ``x`` is saved and the
derivative is one fused pass that recomputes the tanh (cheaper than reading a saved array on
a CPU, where these passes are memory-bound): the GPT CPU quick-start step ran ~4 % faster
(benchmarks/NOTES.md). Same function as torch's ``F.gelu(x, approximate="tanh")``, which
also computes bf16 inputs in fp32. ``relu_squared`` saves relu(x) only (the MoE plan's peak
fell 0.3-0.4 GiB).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _tanh_arg(x):
    return jnp.tanh(_C * (x + _A * x * x * x))


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in fp32 whatever x's dtype
    (as torch does for bf16), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + _tanh_arg(x32))).astype(x.dtype)


def _forward(x):
    return gelu_tanh(x), x


def _backward(x, g):
    x = x.astype(jnp.float32)
    t = _tanh_arg(x)
    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)
    return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu_tanh.defvjp(_forward, _backward)


@jax.custom_vjp
def relu_squared(x: jax.Array) -> jax.Array:
    """relu(x)^2, the experts' activation. Saves relu(x) only; the backward 2 relu(x) g is one
    pass (relu(x) is 0 exactly where the derivative is)."""
    return jnp.square(jax.nn.relu(x))


def _relu2_forward(x):
    r = jax.nn.relu(x)
    return jnp.square(r), r


def _relu2_backward(r, g):
    return ((2.0 * r * g).astype(r.dtype),)


relu_squared.defvjp(_relu2_forward, _relu2_backward)
