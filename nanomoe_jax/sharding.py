"""Placing a training run on many devices with ``jax.sharding``: one ``Mesh`` with three named
axes and a ``NamedSharding`` for every array the train step touches.

* ``data``: data parallel. Parameters and optimizer state are replicated; each device takes its
  own rows of the batch; XLA all-reduces the gradients.
* ``fsdp``: fully sharded data parallel. Also takes its own rows, but every parameter (and its
  AdamW moments) is split along its largest dimension divisible by the axis size; XLA gathers a
  layer's weights just before use and reduce-scatters the gradients.
* ``expert``: expert parallel (MoeGPT). Also takes its own rows; the MoE weights are split along
  the expert dimension, so each device holds E/K experts. Tokens travel to their experts: the
  capacity buffer is constrained to be sharded by expert, so XLA exchanges it with an
  all-to-all on the way in and on the way back, and expert weights never move.

Every device is one data-parallel replica in the original's sense: the global batch is split
into one slice of ``B`` rows per device (device d of the mesh reads the rows rank d of the
original's DDP would read), the loss of each slice is computed on its own (MoE capacity and
balance loss included) and the slices' losses averaged, exactly as DDP averages gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanomoe.config import MoeGPTConfig
from nanomoe.errors import ConfigError

AXES = ("data", "fsdp", "expert")
BATCH_AXES = AXES  # every device takes its own rows of the batch
EXPERT_PARAMS = ("fc_weight", "fc_bias", "proj_weight", "proj_bias")  # MoE (L, E, ...) arrays


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> {'data': 2, 'fsdp': 4, 'expert': 1}. Axes left out are 1, except
    ``data`` which takes the devices the others leave (all of them by default)."""
    sizes: dict[str, int] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh: {part.strip()!r} is not AXIS=N with AXIS one of "
                              f"{', '.join(AXES)} and N >= 1 (e.g. --mesh data=2,fsdp=4)")
        sizes[name] = int(value)
    if "data" not in sizes:
        rest = int(np.prod([sizes.get(a, 1) for a in AXES if a != "data"]))
        if n_devices % rest:
            raise ConfigError(f"--mesh {spec}: {n_devices} devices cannot be split into groups "
                              f"of {rest}; choose axis sizes whose product divides {n_devices}")
        sizes["data"] = n_devices // rest
    shape = {a: sizes.get(a, 1) for a in AXES}
    total = int(np.prod(list(shape.values())))
    if total != n_devices:
        raise ConfigError(f"--mesh {spec}: the axis sizes multiply to {total} but there are "
                          f"{n_devices} devices; make the product equal {n_devices}")
    return shape


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    # Auto axes: XLA's partitioner propagates the shardings given at the jit boundary
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _key(entry) -> Any:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))


def param_spec(path, shape: tuple[int, ...], mesh: Mesh, config) -> P:
    """Where one parameter (or an optimizer moment of the same shape) lives. Layer-stacked
    arrays (under ``blocks``) keep their leading layer axis whole: the scan slices it."""
    keys = [_key(k) for k in path]
    spec: list[Any] = [None] * len(shape)
    first = 1 if "blocks" in keys else 0
    expert_size, fsdp_size = mesh.shape["expert"], mesh.shape["fsdp"]
    if (expert_size > 1 and isinstance(config, MoeGPTConfig)
            and any(k in EXPERT_PARAMS for k in keys) and len(shape) > first):
        if shape[first] % expert_size:
            raise ConfigError(f"--mesh expert={expert_size}: {shape[first]} experts cannot be "
                              f"split over {expert_size} devices; choose an expert axis size "
                              "that divides n_experts * m_sub_experts")
        spec[first] = "expert"
        first += 1
    if fsdp_size > 1:
        dims = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
        if dims:  # the largest divisible dimension; small odd vectors stay replicated
            spec[max(dims, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, config):
    """NamedShardings for a pytree of arrays (parameters, or optimizer state holding
    parameter-shaped moments under the same names); scalars are replicated."""
    def one(path, x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, param_spec(path, shape, mesh, config) if shape else P())

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(A, D, B, T) micro-batches: D (one slice per device) split over every axis."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def bytes_per_device(tree) -> dict[int, int]:
    """Bytes each device holds of a pytree of jax Arrays (to check that fsdp really shards)."""
    out: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out
