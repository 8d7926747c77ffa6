"""Gradient accumulation on one device with the layers unrolled takes the gradient with
respect to each layer's own expert arrays (nanomoe_jax/train.py, ``unstacked``): the same
gradients as plain autodiff of the stacked parameters, in the stacked layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanomoe import MoeGPTConfig
from nanomoe_jax import model_class
from nanomoe_jax.expert_arrays import layer_stacked_experts, restacked, unstacked
from nanomoe_jax.train import accumulate_gradients, loss_and_metrics

CONFIG = MoeGPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                      n_experts=4, n_activated_experts=2, expert_dim=16)


def setup(scan_layers, dtype=jnp.float32):
    model = model_class(CONFIG)(CONFIG, rngs=nnx.Rngs(0), dtype=dtype,
                                scan_layers=scan_layers, moe_dispatch="grouped")
    # the experts' output weights start at 0: random ones, so every gradient is non-zero
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param),
                                is_leaf=lambda v: isinstance(v, nnx.Variable)):
        if not float(jnp.abs(leaf[...]).max()):
            leaf[...] = 0.02 * jax.random.normal(jax.random.key(1), leaf.shape)
    return nnx.split(model, nnx.Param)


def test_only_the_stacked_expert_arrays_split_and_they_stack_back():
    _, params = setup(False)
    stacked = layer_stacked_experts(params)
    assert sum(jax.tree.leaves(stacked)) == 4  # fc and proj weights and biases
    split = unstacked(params, stacked)
    assert len(jax.tree.leaves(split)) == len(jax.tree.leaves(params)) + 4 * (CONFIG.n_layer - 1)
    for a, b in zip(jax.tree.leaves(restacked(split, stacked)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unrolled_accumulation_equals_autodiff_of_the_stacks(dtype):
    """In bf16 the expert matrices are cast once, outside the loop: the same numbers as the
    model's own casts."""
    graphdef, params = setup(False, dtype)
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, 64, (2, 2, 16)), jnp.int32) for _ in range(2))
    got, metrics = jax.jit(accumulate_gradients, static_argnums=0)(graphdef, params, x, y)

    def mean_loss(p):
        return sum(loss_and_metrics(graphdef, p, x[w], y[w])[0] for w in range(2)) / 2

    want = jax.jit(jax.grad(mean_loss))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
