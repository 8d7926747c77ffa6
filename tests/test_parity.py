"""JAX vs the PyTorch reference: forward, losses, routing and gradients (fp32), bf16 forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
from helpers import ALL_CONFIGS, MOE_CONFIGS, jax_twin, no_drop, random_torch_model, rel_err, tokens
from nanomoe import GPTConfig, MoeGPTConfig
from nanomoe_jax.moe import route as jax_route
from nanomoe_torch.moe import route as torch_route

LOSS_KEYS = ("loss", "ce_loss", "moe_loss")

# one compiled program per call instead of op-by-op dispatch (much faster on 2 CPU cores)
jax_call = nnx.jit(lambda m, idx, tgt=None: m(idx) if tgt is None else m(idx, tgt))


def _cases():
    for name, cfg in ALL_CONFIGS.items():
        if isinstance(cfg, MoeGPTConfig):
            for dispatch in ("dense", "capacity", "ragged"):
                yield pytest.param(no_drop(cfg.__class__(**{**cfg.__dict__, "moe_dispatch": dispatch})),
                                   id=f"{name}-{dispatch}")
        else:
            yield pytest.param(cfg, id=name)


@pytest.mark.parametrize("config", list(_cases()))
def test_forward_and_loss_fp32(config):
    tm = random_torch_model(config, seed=1)
    jm = jax_twin(tm, dtype=jnp.float32)
    # GPT (like the original) has no ignore index; the others ignore -1
    idx, tgt = tokens(config, ignore_some=not isinstance(config, GPTConfig))
    t_out = tm(torch.from_numpy(idx), torch.from_numpy(tgt))
    j_out = jax_call(jm, jnp.asarray(idx), jnp.asarray(tgt))
    assert rel_err(j_out[0], t_out[0].detach()) <= 1e-5
    for key in LOSS_KEYS:
        if key in t_out[1]:
            np.testing.assert_allclose(float(j_out[1][key]), float(t_out[1][key]), rtol=1e-5)
    # without targets the structure is the reference's too
    t_plain, j_plain = tm(torch.from_numpy(idx)), jax_call(jm, jnp.asarray(idx))
    assert len(t_plain) == len(j_plain)
    assert rel_err(j_plain[0], t_plain[0].detach()) <= 1e-5


def _moe_inputs(tm, idx):
    """The input of every MoE layer of the torch model, captured with hooks."""
    seen = []
    hooks = [b.mlp.impl.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
             for b in tm.blocks]
    tm(torch.from_numpy(idx))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_selects_the_same_experts(name):
    config = MOE_CONFIGS[name]
    tm = random_torch_model(config, seed=2)
    jm = jax_twin(tm, dtype=jnp.float32)
    idx, _ = tokens(config, B=3, T=20, seed=2)
    graphdef, stacked = nnx.split(jm.blocks)
    for layer, x in enumerate(_moe_inputs(tm, idx)):
        impl = tm.blocks[layer].mlp.impl
        t_r = impl.router(x)
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], stacked))
        j_r = jax_route(block.mlp.gate_linear(jnp.asarray(x.detach().numpy())), config)
        t_gates = t_r.gates.detach().numpy()
        np.testing.assert_array_equal(np.asarray(j_r.gates_NE) > 0, t_gates > 0)
        np.testing.assert_allclose(np.asarray(j_r.gates_NE), t_gates, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(j_r.usage_E), t_r.usage.numpy())
        np.testing.assert_allclose(float(j_r.balance_loss), float(t_r.balance_loss), rtol=1e-5)


def torch_grads(tm, idx, tgt):
    tm.zero_grad()
    tm(torch.from_numpy(idx), torch.from_numpy(tgt))[1]["loss"].backward()
    return {k: p.grad.numpy() for k, p in tm.named_parameters()}


def jax_grads(jm, idx, tgt):
    grads = nnx.jit(nnx.grad(lambda m, i, t: m(i, t)[1]["loss"]))(jm, jnp.asarray(idx),
                                                                   jnp.asarray(tgt))
    holder = nnx.clone(jm)
    nnx.update(holder, grads)
    return conversion.export_arrays(holder)


@pytest.mark.parametrize("config", list(_cases()))
def test_gradients_fp32(config):
    tm = random_torch_model(config, seed=3)
    jm = jax_twin(tm, dtype=jnp.float32)
    idx, tgt = tokens(config, seed=3)
    t_grads, j_grads = torch_grads(tm, idx, tgt), jax_grads(jm, idx, tgt)
    # named_parameters lists the tied matrix once, under the embedding's name
    assert set(t_grads) <= set(j_grads)
    for name, g in t_grads.items():
        assert np.abs(g).max() > 0, f"{name}: zero reference gradient tests nothing"
        assert rel_err(j_grads[name], g) <= 1e-4, name


@pytest.mark.parametrize("config", list(_cases()))
def test_bf16_forward_close_to_fp32_reference(config):
    tm = random_torch_model(config, seed=4)
    jm = jax_twin(tm, dtype=jnp.bfloat16)
    idx, tgt = tokens(config, B=4, T=16, seed=4)
    t_out = tm(torch.from_numpy(idx), torch.from_numpy(tgt))
    j_out = jax_call(jm, jnp.asarray(idx), jnp.asarray(tgt))
    assert j_out[0].dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(jm, nnx.Param)))
    ref = t_out[0].detach().numpy()
    token_err = np.abs(np.asarray(j_out[0], np.float32) - ref).max(-1) / np.abs(ref).max()
    if isinstance(config, MoeGPTConfig):
        # A token whose top-k scores are tied within bf16 noise may pick another expert (torch
        # autocast does the same on other tokens): its logits jump, and through attention its
        # successors move a little. Routing is discrete, so the bound holds for most tokens;
        # test_moe_layer_bf16 checks the arithmetic strictly with the routing held equal.
        assert np.mean(token_err <= 2e-2) >= 0.9, np.sort(token_err.ravel())[-5:]
    else:
        assert token_err.max() <= 2e-2
    np.testing.assert_allclose(float(j_out[1]["loss"]), float(t_out[1]["loss"]), rtol=2e-2)


@pytest.mark.parametrize("dispatch", ["dense", "capacity", "ragged"])
@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_layer_bf16(name, dispatch):
    """One MoE layer in bf16 vs the fp32 reference on the same fp32 input: the router runs in
    fp32 on both sides, so the experts chosen are equal and only bf16 arithmetic differs."""
    config = no_drop(MoeGPTConfig(**{**MOE_CONFIGS[name].__dict__, "moe_dispatch": dispatch}))
    tm = random_torch_model(config, seed=5)
    jm = jax_twin(tm, dtype=jnp.bfloat16)
    torch.manual_seed(5)
    x = torch.randn(2, 16, config.n_embd)
    y_ref, aux_ref = tm.blocks[0].mlp(x)
    graphdef, stacked = nnx.split(jm.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    y, metrics = nnx.jit(lambda m, x: m(x))(block.mlp, jnp.asarray(x.numpy()))
    assert rel_err(np.asarray(y, np.float32), y_ref.detach()) <= 2e-2
    np.testing.assert_allclose(float(metrics["balance_loss"]), float(aux_ref), rtol=1e-5)
