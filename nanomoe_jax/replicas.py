"""A training step on a mesh: who runs which slice, and where each device's gradient stays
until the step's one reduction.

The Y device slices of a micro-batch form F groups, one per index of the ``data`` axis, of g
slices each (the group's fsdp x expert devices). The gradient is taken with respect to copies
of the parameters: each group gets its own copy of what it splits (on fsdp or expert) and each
slice its own copy of the rest, so the gradient of a copy is its group's or slice's alone.
Nothing is reduced per micro-batch but what the splits need (the fsdp reduce-scatter, the
expert exchange); the copies are summed once after the micro-batch loop, in fp32, and the
tied embedding's two uses add up on their device first.

Every device runs the one-device program on its own slice (a ``shard_map`` over every
axis), with its own shards: fsdp weights are gathered by ``all_gather`` (whose transpose is
the gradient's reduce-scatter, sharding.Placement), the experts of an expert axis are this
device's E/X and the routed rows travel by all-to-all (expert_parallel.py), and MoeGPT keeps
the grouped-GEMM kernels (custom calls XLA's partitioner could not split).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from .sharding import spec_axes

INNER = ("fsdp", "expert")  # the axes of one group's slices
F_g = P("data", INNER)  # (F, g, ...): each slice of each group on its own device


class Copies:
    """The parameter copies of a mesh step with Y slices (``grad_sharding``: the parameters'
    NamedShardings). A leaf's copy is split over ``data`` and over each axis of a group
    (``fsdp``, ``expert``) that the leaf is not split on itself: (F, *free axes, ...). Every
    mesh axis is then named in its spec, so nothing of its gradient is reduced per
    micro-batch (a shard_map psums the cotangent over an axis a spec leaves out)."""

    def __init__(self, grad_sharding, Y: int):
        self.sharding = grad_sharding
        self.mesh = jax.tree.leaves(grad_sharding)[0].mesh
        self.F = self.mesh.shape["data"]
        self.g = Y // self.F  # slices of one group (lower case: derived, docs/dimensions.md)
        self.free = jax.tree.map(lambda s: tuple(a for a in INNER if a not in spec_axes(s.spec)),
                                 grad_sharding)

    def specs(self):
        """Where each copy lives: (F, *free, ...) over ("data", *free, *its own spec)."""
        return jax.tree.map(lambda s, f: P("data", *f, *s.spec), self.sharding, self.free)

    def pin(self, tree):
        return jax.tree.map(lambda v, spec: jax.lax.with_sharding_constraint(
            v, NamedSharding(self.mesh, spec)), tree, self.specs())

    def make(self, params):
        def one(p, f):
            return jnp.broadcast_to(p, (self.F, *(self.mesh.shape[a] for a in f), *p.shape))
        return self.pin(jax.tree.map(one, params, self.free))

    def reduce(self, grads):
        """The one reduction: the copies summed in fp32, onto the parameters' shardings."""
        total = jax.tree.map(lambda g, f: jnp.sum(g, tuple(range(1 + len(f)))), grads, self.free)
        return jax.lax.with_sharding_constraint(total, self.sharding)

    def group_losses(self, slice_loss):
        """``(copies, x_FgBT, y_FgBT) -> (sum over groups of their mean loss, mean metrics)``:
        ``slice_loss(params, x_BT, y_BT)`` runs on every device, on its own slice with its
        own shards."""
        def one(p, x, y):
            local = jax.tree.map(lambda v, f: v[(0,) * (1 + len(f))], p, self.free)
            loss, metrics = slice_loss(local, x[0, 0], y[0, 0])
            return loss[None, None], jax.tree.map(lambda m: m[None, None], metrics)

        def losses(p_F, x_FgBT, y_FgBT):
            # check_vma off: Pallas kernels declare outputs without the per-device typing it
            # checks
            loss_Fg, metrics_Fg = jax.shard_map(
                one, mesh=self.mesh, in_specs=(self.specs(), F_g, F_g), out_specs=F_g,
                check_vma=False)(p_F, x_FgBT, y_FgBT)
            return jnp.sum(jnp.mean(loss_Fg, 1)), jax.tree.map(jnp.mean, metrics_Fg)

        return losses


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
