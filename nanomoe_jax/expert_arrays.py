"""One device, layers unrolled: the MoE's expert parameters as each layer's own arrays in the
micro-batch loop (``train.accumulate_gradients``).

A layer's expert weights are a slice of their (L, E, ...) stack. Our kernels and tokamax's
take a layer's weights as a whole buffer, so XLA copied each slice out of the stack in every
micro-batch, and copied each layer's gradient back into a stacked one before the
accumulator's add (XLA does not hoist a slice out of a loop on its own; a GEMM fusion of its
own reads the slice in place, so the dense layers never paid this). Here the stacks are split
once a step, before the loop, and the gradients stacked once after it.

The expert matrices also go to the kernels in the compute dtype, cast once a step rather than
once a micro-batch (tokamax's GEMMs took a cast copy of W1 and a transposed one of W2 every
micro-batch; ours read fp32 and cast on load). The numbers are the same: the kernels round
the weights to the compute dtype either way, and their weight gradients are in it already
(``gather_wgrad(..., out_dtype)``); the gradient reaching the fp32 parameter is that one,
widened. Biases stay as stored: the kernels add them in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import sharding as shd


def layer_stacked_experts(params):
    """The experts' parameters stacked over the layers: what our MoE kernels take whole."""
    return shd.per_parameter(params,
                             lambda axes: axes[:1] == (shd.LAYERS,) and shd.EXPERTS in axes)


def expert_matrices(params):
    """Those of them that are matrices (W1, W2: two axes besides the layers' and experts')."""
    return shd.per_parameter(params, lambda axes: axes[:1] == (shd.LAYERS,)
                             and shd.EXPERTS in axes and len(axes) >= 4)


def unstacked(params, stacked):
    """Each layer-stacked parameter as a tuple of its layers' arrays."""
    return jax.tree.map(lambda s, a: tuple(a) if s else a, stacked, params)


def restacked(params, stacked):
    """The inverse of :func:`unstacked`."""
    return jax.tree.map(lambda s, a: jnp.stack(a) if s else a, stacked, params)


@jax.custom_vjp
def _computed_as(w, w_low):
    """``w`` as its copy ``w_low`` in the compute dtype; the gradient goes to ``w``."""
    return w_low


def _computed_as_fwd(w, w_low):
    return w_low, jnp.zeros((0,), w.dtype)


def _computed_as_bwd(res, ct):
    return ct.astype(res.dtype), None


_computed_as.defvjp(_computed_as_fwd, _computed_as_bwd)


def per_layer(graphdef, params, loss_fn):
    """``(loss, params_F, reduce)`` for the one-device step: ``loss(params_F, x, y)`` is
    ``loss_fn(graphdef, params, x, y)`` taken with respect to ``params_F`` (the expert stacks
    split by layer), ``reduce`` stacks a gradient of ``params_F`` back. Call it outside the
    micro-batch loop: the split and the casts happen where it is called."""
    opts = nnx.merge(graphdef, params).opts
    stacked, matrices = layer_stacked_experts(params), expert_matrices(params)
    params_F = unstacked(params, stacked)
    low = jnp.dtype(opts.dtype) != jnp.dtype(opts.param_dtype)
    low_F = jax.tree.map(lambda m, a: (tuple(w.astype(opts.dtype) for w in a) if m and low
                                       else None), matrices, params_F)

    def as_computed(p_F):
        return jax.tree.map(lambda m, a, c: tuple(map(_computed_as, a, c)) if m and low else a,
                            matrices, p_F, low_F, is_leaf=lambda x: x is None)

    def loss(p_F, x, y):
        return loss_fn(graphdef, restacked(as_computed(p_F), stacked), x, y)

    return loss, params_F, lambda g: restacked(g, stacked)
