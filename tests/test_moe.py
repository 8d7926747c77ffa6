"""The JAX MoE back ends against each other (outputs, metrics and gradients when nothing
drops), the capacity back end's drops, sparse back ends doing no dense expert work, and which
back end the execution options pick. The grouped tiles and tokamax: test_moe_grouped.py."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import MOE_CONFIGS, no_drop
from nanomoe import MoeGPTConfig
from nanomoe_jax.layers import Options
from nanomoe_jax.moe import MoE, route
from nanomoe_jax.ragged_gemm import unavailable_reason

# tokamax's grouped GEMM where it imports (its XLA reference on CPU; the Triton kernels
# themselves, interpreted, in tests/test_ragged_gemm.py)
TOKAMAX = () if unavailable_reason() else ("tokamax",)


def random_moe(config, seed=0):
    """A MoE layer with every tensor random and non-zero."""
    layer = MoE(config, Options(dtype=jnp.float32), nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            var.set_value(var.get_value() + 0.05 * jax.random.normal(next(keys), var.shape))
    return layer


def with_dispatch(layer, dispatch, capacity_factor=None):
    """The same weights under another back end."""
    config = dataclasses.replace(layer.config, moe_dispatch=dispatch,
                                 capacity_factor=capacity_factor or layer.config.capacity_factor)
    other = nnx.clone(layer)
    other.config = config
    return other


@nnx.jit
def outputs_and_grads(layer, x):
    def loss(m, x):
        y, metrics = m(x)
        return jnp.sum(jnp.sin(y)) + metrics["balance_loss"], (y, metrics)

    (_, (y, metrics)), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, metrics, nnx.state(g_model, nnx.Param), g_x


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_back_ends_agree_when_nothing_drops(name):
    layer = random_moe(no_drop(MOE_CONFIGS[name]), seed=1)
    x = jax.random.normal(jax.random.key(2), (3, 10, layer.config.n_embd))
    y_ref, m_ref, g_ref, gx_ref = outputs_and_grads(with_dispatch(layer, "dense"), x)
    for dispatch in ("capacity", "ragged", "grouped", *TOKAMAX):
        y, metrics, g, gx = outputs_and_grads(with_dispatch(layer, dispatch), x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(y_ref).max()))
        assert float(metrics["dropped_fraction"]) == 0.0
        np.testing.assert_array_equal(metrics["tokens_per_expert"], m_ref["tokens_per_expert"])
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(gx_ref).max()))
        for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
            b = b.get_value()
            scale = float(jnp.abs(b).max())
            assert scale > 0, path
            np.testing.assert_allclose(a.get_value(), b, rtol=1e-5, atol=1e-6 * scale,
                                       err_msg=str(path))


def expected_drops(top_idx_NK, n_routed, capacity):
    """By hand: walk tokens in order (position-major); each expert takes its first `capacity`
    assignments."""
    taken = np.zeros(n_routed, int)
    kept = np.zeros(top_idx_NK.shape, bool)
    for n, row in enumerate(top_idx_NK):
        for j, e in enumerate(row):
            kept[n, j] = taken[e] < capacity
            taken[e] += 1
    return kept


@pytest.mark.parametrize("capacity_factor", [0.3, 0.7, 1.0])
def test_capacity_drops_exactly_what_it_counts(capacity_factor):
    config = MoeGPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=32, vocab_size=64,
                          n_experts=6, n_shared_experts=1, n_activated_experts=2)
    layer = random_moe(config, seed=3)
    B, T = 2, 16
    x = jax.random.normal(jax.random.key(4), (B, T, config.n_embd))
    small = with_dispatch(layer, "capacity", capacity_factor)
    capacity = small.config.capacity(B * T)
    assert capacity == max(1, min(B * T, math.ceil(capacity_factor * B * T * 2 / 5)))
    y, metrics = nnx.jit(lambda m, x: m(x))(small, x)

    x_NC = x.transpose(1, 0, 2).reshape(T * B, -1)  # the layer ranks tokens position-major
    r = route(layer.gate_linear(x_NC), config)
    kept_NK = expected_drops(np.asarray(r.top_idx_NK), config.n_routed_experts, capacity)
    assert (~kept_NK).sum() > 0, "the test must make something drop"
    assert float(metrics["dropped_fraction"]) == pytest.approx((~kept_NK).mean())

    # Expected output: the dense math with the dropped (token, expert) gates set to zero.
    S = config.n_shared
    gates_NE = np.array(r.gates_NE)
    for n, j in zip(*np.nonzero(~kept_NK)):
        gates_NE[n, S + int(r.top_idx_NK[n, j])] = 0.0
    from nanomoe_jax.moe import dense_dispatch

    w = [p.get_value() for p in (layer.fc_weight, layer.fc_bias, layer.proj_weight, layer.proj_bias)]
    y_expected = dense_dispatch(x_NC, r._replace(gates_NE=jnp.asarray(gates_NE)), w)
    np.testing.assert_allclose(y.transpose(1, 0, 2).reshape(T * B, -1), y_expected,
                               rtol=1e-5, atol=1e-6)


def test_capacity_factor_at_routed_over_k_never_drops():
    config = MoeGPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=64, vocab_size=64,
                          n_experts=8, n_shared_experts=1, n_activated_experts=2,
                          capacity_factor=7 / 2)
    layer = random_moe(config, seed=5)
    # every token prefers the same experts: the worst case for capacity
    layer.gate_linear.bias.set_value(jnp.arange(8.0) * 10)
    x = jax.random.normal(jax.random.key(6), (2, 32, 16))
    _, metrics = nnx.jit(lambda m, x: m(x))(layer, x)
    assert float(metrics["dropped_fraction"]) == 0.0
    assert config.capacity(64) == 64


@pytest.mark.parametrize("dispatch", ["capacity", "ragged"])
def test_sparse_back_ends_do_no_dense_expert_work(dispatch):
    """No intermediate of a sparse back end grows with E, except the router's (N, E) and the
    expert weights themselves: expert work grows with k, not with E."""
    N, C, H = 256, 16, 32

    def activation_elements(n_experts):
        config = MoeGPTConfig(n_layer=1, n_embd=C, n_head=2, block_size=N, vocab_size=64,
                              n_experts=n_experts, n_shared_experts=1, n_activated_experts=2,
                              capacity_factor=1.0, moe_dispatch=dispatch)
        layer = random_moe(config)
        E, R = n_experts, n_experts - 1
        jaxpr = jax.make_jaxpr(lambda x: layer(x)[0])(jnp.ones((1, N, C)))

        def exempt(shape):
            router = shape in {(N, E), (N, R), (E,), (R,), (R + 1,)}
            weights = len(shape) >= 2 and shape[0] in (E, R) and set(shape[1:]) <= {C, H}
            return router or weights

        return sum(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars
                   if not exempt(tuple(v.aval.shape)))

    # 16x the experts at the same k: activations grow by the capacity rounding at most
    assert activation_elements(64) <= 1.15 * activation_elements(4)


def test_options_moe_dispatch_overrides_the_config():
    layer = random_moe(MOE_CONFIGS["default"], seed=2)
    x = jax.random.normal(jax.random.key(3), (2, 9, layer.config.n_embd))
    overridden = nnx.clone(layer)
    overridden.opts = Options(dtype=jnp.float32, moe_dispatch="grouped")
    y_ref, _ = with_dispatch(layer, "grouped")(x)
    y, _ = overridden(x)
    np.testing.assert_array_equal(y, y_ref)
    with pytest.raises(ValueError, match="moe_dispatch"):
        Options(moe_dispatch="sparse")


class FakeDevice:
    def __init__(self, platform, kind):
        self.platform, self.device_kind = platform, kind


def test_execution_options_pick_tokamax_where_it_runs(monkeypatch):
    from nanomoe_jax import execution, ragged_gemm
    from nanomoe_jax.execution import execution_notes, execution_options

    gpu, old = FakeDevice("gpu", "NVIDIA GeForce RTX 4090"), FakeDevice("gpu", "Tesla V100")
    cpu, moe = FakeDevice("cpu", "cpu"), MoeGPTConfig()
    monkeypatch.setattr(ragged_gemm, "unavailable_reason", lambda: None)
    assert execution_options(gpu, moe).moe_dispatch == "tokamax"
    assert execution_notes(gpu, moe) == []
    assert execution_options(cpu, moe).moe_dispatch is None  # the config's capacity
    assert execution_options(gpu, moe, moe_dispatch="capacity").moe_dispatch == "capacity"
    assert execution_options(gpu, moe, expert_mesh=object()).moe_dispatch == "tokamax"
    assert execution_options(cpu, moe, expert_mesh=object()).moe_dispatch is None
    # refused: an old card, odd sizes; each says why, once
    assert execution_options(old, moe).moe_dispatch == "grouped"
    assert "V100" in execution_notes(old, moe)[0]
    for odd in (MoeGPTConfig(n_embd=72, n_head=4), MoeGPTConfig(expert_dim=96)):
        assert execution_options(gpu, odd).moe_dispatch == "grouped"
        assert "not multiples of 64 x 128" in execution_notes(gpu, odd)[0]
        # on an expert mesh the exchange stays; its experts run as tiles, and the note says so
        assert execution_options(gpu, odd, expert_mesh=object()).moe_dispatch == "capacity"
        assert "each device's experts as padded tiles" in execution_notes(
            gpu, odd, expert_mesh=object())[0]
    # missing: the padded tiles, also when asked for by name
    monkeypatch.setattr(ragged_gemm, "unavailable_reason", lambda: "tokamax does not import")
    for given in ({}, {"moe_dispatch": "tokamax"}):
        assert execution_options(gpu, moe, **given).moe_dispatch == "grouped"
        assert execution_notes(gpu, moe, **given) == [
            "moe_dispatch=grouped (padded tiles, each expert's weights read per tile) instead "
            "of tokamax's grouped GEMM: tokamax does not import"]
    assert execution.execution_notes(cpu, moe) == []
