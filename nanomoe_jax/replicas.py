"""A training step on a mesh: who runs which slice, and where each device's gradient stays
until the step's one reduction.

The Y device slices of a micro-batch form F groups, one per index of the ``data`` axis, of g
slices each (the group's fsdp x expert devices). The gradient is taken with respect to copies
of the parameters: each group gets its own copy of what it splits (on fsdp or expert) and each
slice its own copy of the rest, so the gradient of a copy is its group's or slice's alone.
Nothing is reduced per micro-batch but what the splits need (the fsdp reduce-scatter, the
expert exchange); the copies are summed once after the micro-batch loop, in fp32, and the
tied embedding's two uses add up on their device first.

The slices run one of two ways (:func:`sharding.runs_per_device`):

* **per device** (no expert axis): a ``shard_map`` over every axis. Each device traces the
  one-device program on its own slice, so MoeGPT keeps the grouped-GEMM kernels (custom
  calls XLA's partitioner cannot split) and fsdp weights are gathered by ``all_gather``
  (whose transpose is the gradient's reduce-scatter, sharding.Placement).
* **partitioned** (an expert axis): a ``vmap`` over the groups and their slices, which XLA's
  partitioner places from sharding constraints, the expert exchange included
  (expert_parallel.py: a ``shard_map`` under that vmap would see the slices replicated).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from .sharding import runs_per_device, spec_axes

INNER = ("fsdp", "expert")  # the axes of one group's slices
F_g = P("data", INNER)  # (F, g, ...): each slice of each group on its own device


class Copies:
    """The parameter copies of a mesh step with Y slices (``grad_sharding``: the parameters'
    NamedShardings)."""

    def __init__(self, grad_sharding, Y: int):
        self.sharding = grad_sharding
        self.mesh = jax.tree.leaves(grad_sharding)[0].mesh
        self.F = self.mesh.shape["data"]
        self.g = Y // self.F  # slices of one group (lower case: derived, docs/dimensions.md)
        self.per_device = runs_per_device(self.mesh)
        self.per_slice = jax.tree.map(lambda s: not set(INNER) & spec_axes(s.spec),
                                      grad_sharding)

    def specs(self):
        """Where each copy lives: (F, g, ...) per slice, (F, ...) per group. Per device every
        axis is named (the unsplit ones are size 1): an axis a shard_map spec leaves out gets
        its cotangent psum-ed in every micro-batch."""
        group = ("data", "expert") if self.per_device else "data"
        return jax.tree.map(lambda s, c: P("data", INNER, *s.spec) if c else P(group, *s.spec),
                            self.sharding, self.per_slice)

    def pin(self, tree):
        return jax.tree.map(lambda v, spec: jax.lax.with_sharding_constraint(
            v, NamedSharding(self.mesh, spec)), tree, self.specs())

    def make(self, params):
        def one(p, c):
            return jnp.broadcast_to(p, (self.F, self.g, *p.shape) if c else (self.F, *p.shape))
        return self.pin(jax.tree.map(one, params, self.per_slice))

    def reduce(self, grads):
        """The one reduction: the copies summed in fp32, onto the parameters' shardings."""
        total = jax.tree.map(lambda g, c: jnp.sum(g, (0, 1) if c else 0), grads, self.per_slice)
        return jax.lax.with_sharding_constraint(total, self.sharding)

    def group_losses(self, slice_loss, slices_loss):
        """``(copies, x_FgBT, y_FgBT) -> (sum over groups of their mean loss, mean metrics)``.
        ``slice_loss(params, x_BT, y_BT)`` runs one slice on its device (per device);
        ``slices_loss(params, x_gBT, y_gBT, param_axes)`` a group's g slices (partitioned)."""
        if self.per_device:
            return partial(self._per_device, slice_loss)
        axes = jax.tree.map(lambda c: 0 if c else None, self.per_slice)

        def losses(p_F, x_FgBT, y_FgBT):
            one = partial(slices_loss, param_axes=axes)
            loss_F, metrics_F = jax.vmap(one, spmd_axis_name="data")(p_F, x_FgBT, y_FgBT)
            return jnp.sum(loss_F), jax.tree.map(jnp.mean, metrics_F)
        return losses

    def _per_device(self, slice_loss, p_F, x_FgBT, y_FgBT):
        def one(p, x, y):
            local = jax.tree.map(lambda v, c: v[0, 0] if c else v[0], p, self.per_slice)
            loss, metrics = slice_loss(local, x[0, 0], y[0, 0])
            return loss[None, None], jax.tree.map(lambda m: m[None, None], metrics)

        # check_vma off: Pallas kernels declare outputs without the per-device typing it checks
        loss_Fg, metrics_Fg = jax.shard_map(one, mesh=self.mesh, in_specs=(self.specs(), F_g, F_g),
                                            out_specs=F_g, check_vma=False)(p_F, x_FgBT, y_FgBT)
        return jnp.sum(jnp.mean(loss_Fg, 1)), jax.tree.map(jnp.mean, metrics_Fg)


def per_device_mean(slice_loss, param_sharding, params, x_YBT, y_YBT):
    """Evaluation on a mesh without an expert axis: every device runs ``slice_loss`` on its own
    slice with its own parameter shards; the losses and metrics averaged over the slices."""
    mesh = jax.tree.leaves(param_sharding)[0].mesh
    every = P(tuple(mesh.axis_names))
    specs = jax.tree.map(lambda s: s.spec, param_sharding)

    def one(p, x, y):
        loss, metrics = slice_loss(p, x[0], y[0])
        return loss[None], jax.tree.map(lambda m: m[None], metrics)

    loss_Y, metrics_Y = jax.shard_map(one, mesh=mesh, in_specs=(specs, every, every),
                                      out_specs=every, check_vma=False)(params, x_YBT, y_YBT)
    return jnp.mean(loss_Y), jax.tree.map(jnp.mean, metrics_Y)
