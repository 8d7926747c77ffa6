"""RMSNorm and LayerNorm with hand-written backward passes, over the last axis, in fp32.

The modules subclass Flax's ``nnx.RMSNorm`` / ``nnx.LayerNorm`` and keep their parameters
(``scale``, ``bias``), so checkpoints and converters see the same state; only the call differs.
XLA's autodiff of the library norms materialises the broadcast statistics and makes several
passes over the activations each way; here the forward saves x (centred, for LayerNorm) and
1/rms per row, and the backward is the textbook formula in two reductions and one pass:

    x_hat = x / rms,  dx = (g*w - mean(g*w) - x_hat * mean(g*w * x_hat)) / rms

(RMSNorm without the ``mean(g*w)`` term). On 2 CPU cores the MoeGPT CPU preset ran ~4 % faster
a step and the GPT quick start ~2 % (benchmarks/NOTES.md). The variance is the two-pass
``mean((x - mean)^2)``, as torch computes it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

f32 = jnp.float32


def _rows(a):
    return a.reshape(-1, a.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps: float):
    """x / sqrt(mean(x^2) + eps) * scale, in fp32."""
    return _rms_forward(x, scale, eps)[0]


def _rms_forward(x, scale, eps):
    x = x.astype(f32)
    inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * inv * scale, (x, inv, scale)


def _rms_backward(eps, res, g):
    x, inv, scale = res
    x_hat, gw = x * inv, g * scale
    dx = inv * (gw - x_hat * jnp.mean(gw * x_hat, axis=-1, keepdims=True))
    return dx, jnp.sum(_rows(g * x_hat), axis=0)


rms_norm.defvjp(_rms_forward, _rms_backward)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias, in fp32."""
    return _ln_forward(x, scale, bias, eps)[0]


def _ln_forward(x, scale, bias, eps):
    x = x.astype(f32)
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return xc * inv * scale + bias, (xc, inv, scale)


def _ln_backward(eps, res, g):
    xc, inv, scale = res
    x_hat, gw = xc * inv, g * scale
    dx = inv * (gw - jnp.mean(gw, axis=-1, keepdims=True)
                - x_hat * jnp.mean(gw * x_hat, axis=-1, keepdims=True))
    return dx, jnp.sum(_rows(g * x_hat), axis=0), jnp.sum(_rows(g), axis=0)


layer_norm.defvjp(_ln_forward, _ln_backward)


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm``'s parameters, :func:`rms_norm`'s computation (fp32 in and out)."""

    def __call__(self, x, mask=None):
        assert mask is None and self.use_scale, "only the unmasked, scaled norm is used here"
        return rms_norm(x, self.scale[...], self.epsilon)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm``'s parameters, :func:`layer_norm`'s computation (fp32 in and out)."""

    def __call__(self, x, mask=None):
        assert mask is None and self.use_scale and self.use_bias, \
            "only the unmasked norm with scale and bias is used here"
        return layer_norm(x, self.scale[...], self.bias[...], self.epsilon)
