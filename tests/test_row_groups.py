"""Row groups (nanomoe_jax/row_groups.py): the training loss of a micro-batch computed as G
independent graphs gives the numbers of the whole batch, for every model, with ignored
targets, and MoeGPT's balance loss recomputed from the groups' sums; no split where a split
would change the numbers (capacity that can drop)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ALL_CONFIGS, jax_twin, no_drop, random_torch_model, rel_err
from nanomoe_jax.execution import CPU_ROW_GROUPS, execution_options
from nanomoe_jax.row_groups import group_count
from nanomoe_jax.train import slice_loss

jax.config.update("jax_default_matmul_precision", "highest")

# nGPT's paper variant differs only inside attention, which row groups do not touch
CASES = {**{k: no_drop(v) for k, v in ALL_CONFIGS.items() if k != "ngpt-paper-std-rope"},
         "moe-grouped": dataclasses.replace(ALL_CONFIGS["moe-default"], moe_dispatch="grouped",
                                            capacity_factor=0.5)}


def batch(config, B, T=16, seed=0):
    g = np.random.default_rng(seed)
    x = g.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = g.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    ignore = -100 if config.__class__.__name__ == "GPTConfig" else -1
    y[0, :5] = ignore           # some ignored targets in the first group
    y[B - 1, :] = ignore        # and a whole row: with B = G, a group with nothing to count
    return jnp.asarray(x), jnp.asarray(y)


def loss_and_grads(torch_model, groups, x, y):
    model = jax_twin(torch_model, dtype=jnp.float32, row_groups=groups)
    graphdef, params = nnx.split(model, nnx.Param)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: slice_loss(graphdef, p, x, y), has_aux=True))(params)
    return loss, metrics, grads, model


SPLITS = [(name, 2, 4) for name in sorted(CASES)] + [
    ("gpt", 3, 6), ("mqa-glu", 4, 4), ("moe-sigmoid-m2", 4, 4), ("ngpt", 3, 6)]


@pytest.mark.parametrize("name, groups, B", SPLITS)
def test_groups_give_the_whole_batch_numbers(name, groups, B):
    config = CASES[name]
    ref_model = random_torch_model(config, seed=3)
    x, y = batch(config, B)
    loss1, m1, g1, _ = loss_and_grads(ref_model, 1, x, y)
    lossG, mG, gG, model = loss_and_grads(ref_model, groups, x, y)
    assert group_count(model, B, x.shape[1]) == groups  # the split was really made
    assert rel_err(lossG, loss1) <= 1e-6, name
    for k in m1:
        assert rel_err(mG[k], m1[k]) <= 1e-6, (name, k)
    for path, a in jax.tree_util.tree_leaves_with_path(gG):
        b = dict(jax.tree_util.tree_leaves_with_path(g1))[path]
        assert np.abs(np.asarray(b)).max() > 0, (name, path)  # gradients reach every weight
        assert rel_err(a, b) <= 1e-5, (name, jax.tree_util.keystr(path))


def test_moe_balance_loss_is_recomputed_not_averaged():
    """The balance loss is a product of batch sums: averaging the groups' would differ."""
    config = no_drop(ALL_CONFIGS["moe-default"])
    ref_model = random_torch_model(config, seed=5)
    x, y = batch(config, 4)
    model = jax_twin(ref_model, dtype=jnp.float32)
    whole = model(x, y)[1]["moe"]["balance_loss"]
    halves = [model(x[i:i + 2], y[i:i + 2])[1]["moe"]["balance_loss"] for i in (0, 2)]
    assert rel_err((halves[0] + halves[1]) / 2, whole) > 1e-4  # naive averaging is wrong
    grouped = jax_twin(ref_model, dtype=jnp.float32, row_groups=2)
    graphdef, params = nnx.split(grouped, nnx.Param)
    _, metrics = slice_loss(graphdef, params, x, y)
    assert rel_err(metrics["loss"], model(x, y)[1]["loss"]) <= 1e-6


def test_no_split_where_it_would_change_the_numbers():
    config = dataclasses.replace(ALL_CONFIGS["moe-default"], capacity_factor=0.5)  # can drop
    model = jax_twin(random_torch_model(config), dtype=jnp.float32, row_groups=2)
    assert group_count(model, 4, 16) == 1
    model = jax_twin(random_torch_model(no_drop(config)), dtype=jnp.float32, row_groups=2)
    assert group_count(model, 4, 16) == 2
    assert group_count(model, 3, 16) == 1   # 3 rows do not split in 2: lowered to a divisor
    model = jax_twin(random_torch_model(ALL_CONFIGS["gpt"]), dtype=jnp.float32, row_groups=4)
    assert group_count(model, 6, 16) == 3
    assert group_count(model, 1, 16) == 1


def test_execution_options_pick_groups_on_cpu_only():
    class Gpu:
        platform, device_kind, compute_capability = "gpu", "NVIDIA H100", "9.0"

    cpu = jax.devices("cpu")[0]
    assert execution_options(cpu, ALL_CONFIGS["ngpt"]).row_groups == CPU_ROW_GROUPS == 2
    assert execution_options(Gpu(), ALL_CONFIGS["ngpt"]).row_groups == 1
    assert execution_options(cpu, ALL_CONFIGS["ngpt"], row_groups=1).row_groups == 1  # a flag wins
    with pytest.raises(ValueError, match="row_groups"):
        execution_options(cpu, ALL_CONFIGS["ngpt"], row_groups=0)
