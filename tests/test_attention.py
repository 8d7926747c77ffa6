"""The attention with its own VJP (nanomoe_jax/attention.py, CPU default): outputs and
gradients equal jax.nn.dot_product_attention's (itself tested against torch's SDPA) for
multi-head, grouped- and multi-query attention, in fp32 and bf16, and inside every model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ALL_CONFIGS, jax_twin, no_drop, random_torch_model, rel_err
from nanomoe_jax.attention import causal_attention
from nanomoe_jax.train import slice_loss

jax.config.update("jax_default_matmul_precision", "highest")


def qkv(B, T, N, K, H, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    w = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)  # a loss that weighs every output
    return q, k, v, w


def value_and_grads(impl, q, k, v, w, scale):
    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, scale, impl).astype(jnp.float32) * w)
    out = jax.jit(lambda q, k, v: causal_attention(q, k, v, scale, impl))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_equals_dot_product_attention(N, K, dtype, tol):
    q, k, v, w = qkv(3, 24, N, K, 16, dtype)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, w, 0.25)
    out, grads = value_and_grads("custom_vjp", q, k, v, w, 0.25)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert rel_err(out.astype(jnp.float32), ref_out.astype(jnp.float32)) <= tol
    for a, b, name in zip(grads, ref_grads, "qkv"):
        assert a.dtype == b.dtype, name
        assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) <= tol, name


@pytest.mark.parametrize("T, block, max_blocks", [(24, 7, 8), (50, 8, 8), (40, 4, 3), (256, 64, 8)],
                         ids=["4-even", "7-ragged", "capped-at-3", "default-256"])
@pytest.mark.parametrize("N, K", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_query_blocks_equal_one_block(monkeypatch, T, block, max_blocks, N, K):
    """Blocks of queries over their key prefixes: the same outputs and gradients as the
    reference (fp32, 1e-5), for even, ragged and capped block layouts."""
    import nanomoe_jax.attention as attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    monkeypatch.setattr(attention, "MAX_BLOCKS", max_blocks)
    ends = attention.query_block_ends(T)
    assert len(ends) == min(max_blocks, -(-T // block)) > 1 and ends[-1] == T
    assert all(b > a for a, b in zip([0] + ends, ends))
    q, k, v, w = qkv(2, T, N, K, 8, jnp.float32, seed=T)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, w, 0.3)
    out, grads = value_and_grads("custom_vjp", q, k, v, w, 0.3)
    assert rel_err(out, ref_out) <= 1e-5
    for a, b, name in zip(grads, ref_grads, "qkv"):
        assert rel_err(a, b) <= 1e-5, name


def test_causal_first_query_sees_only_itself():
    q, k, v, _ = qkv(1, 8, 2, 2, 8, jnp.float32)
    out = causal_attention(q, k, v, 1.0, "custom_vjp")
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)  # one key: its value, exactly
    later = v.at[:, 5:].set(100.0)  # keys after a query never change its output
    np.testing.assert_allclose(causal_attention(q, k, later, 1.0, "custom_vjp")[:, :5],
                               out[:, :5], rtol=1e-6)


@pytest.mark.parametrize("name", ["gpt", "gqa-gated", "mha-nobias-double", "moe-default", "ngpt"])
def test_models_train_the_same_with_it(monkeypatch, name):
    import nanomoe_jax.attention as attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)  # T=16: blocks of 4, 4, 4, 4
    config = no_drop(ALL_CONFIGS[name])
    ref = random_torch_model(config, seed=2)
    g = np.random.default_rng(0)
    x = jnp.asarray(g.integers(0, config.vocab_size, (2, 16)), jnp.int32)
    y = jnp.asarray(g.integers(0, config.vocab_size, (2, 16)), jnp.int32)
    results = []
    for impl in ("xla", "custom_vjp"):
        graphdef, params = nnx.split(jax_twin(ref, dtype=jnp.float32, attention_impl=impl),
                                     nnx.Param)
        results.append(jax.jit(jax.value_and_grad(
            lambda p: slice_loss(graphdef, p, x, y), has_aux=True))(params))
    (loss_ref, _), grads_ref = results[0]
    (loss, _), grads = results[1]
    assert rel_err(loss, loss_ref) <= 1e-6
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(grads_ref))
    for path, a in jax.tree_util.tree_leaves_with_path(grads):
        assert rel_err(a, flat_ref[path]) <= 1e-5, jax.tree_util.keystr(path)
