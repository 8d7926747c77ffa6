"""Placing a training run on many devices with ``jax.sharding``: one ``Mesh`` with three named
axes and a ``NamedSharding`` for every array the train step touches.

* ``data``: data parallel. Parameters and optimizer state are replicated; each device takes its
  own rows of the batch; XLA all-reduces the gradients.
* ``fsdp``: fully sharded data parallel. Also takes its own rows, but every weight matrix (and
  its AdamW moments) is split along its largest dimension divisible by the axis size. Each
  layer's weights are gathered in the compute dtype inside the layer scan, just before the
  layer runs (:func:`layer_placement`), so activations stay on their rows; the gradients
  come back reduce-scattered.
* ``expert``: expert parallel (MoeGPT). Also takes its own rows; the MoE weights are split along
  the expert dimension, so each device holds E/X experts (X: the axis size, which must divide
  E). Only routed rows travel, to the devices holding their experts and back: on GPUs a
  ``ragged_all_to_all`` of the rows each way, on CPU an ``all_to_all`` of a buffer of a
  capacity per destination device (nanomoe_jax/expert_parallel.py); expert weights never
  move.

Every device is one data-parallel replica in the original's sense: the global batch is split
into one slice of ``B`` rows per device (device d of the mesh reads the rows rank d of the
original's DDP would read), the loss of each slice is computed on its own (MoE capacity and
balance loss included) and the slices' losses averaged, exactly as DDP averages gradients.
"""

from __future__ import annotations

from typing import Any

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanomoe.errors import ConfigError

AXES = ("data", "fsdp", "expert")
BATCH_AXES = AXES  # every device takes its own rows of the batch
LAYERS, EXPERTS = "layers", "experts"  # the logical axes the rule treats apart


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


def spec_axes(spec: P) -> set[str]:
    """The mesh axes a PartitionSpec names."""
    return {a for entry in spec for a in (entry if isinstance(entry, tuple) else (entry,)) if a}


def _key(entry) -> Any:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def declared_axes(variable: nnx.Variable) -> tuple[str, ...]:
    """The logical axes a parameter declared where it was made (layers.with_axes / param;
    the layer stack adds ``layers``). One name per dimension, else an error: a parameter
    left undeclared must not silently end up replicated."""
    axes = variable.get_metadata("out_sharding", None)
    shape = tuple(getattr(variable.get_value(), "shape", ()))  # a sharding's: not checked
    if axes is None or (shape and len(axes) != len(shape)):
        raise ValueError(f"a parameter of shape {shape} declares logical axes {axes}: declare "
                         "one name per dimension where it is made (nanomoe_jax/layers.py, "
                         "with_axes or param; docs/dimensions.md)")
    return tuple(axes)


def per_parameter(params, fn):
    """``fn(logical axes)`` for every parameter (the axes it declared where it was made), as
    a tree shaped like ``params``' arrays (an optax mask, a table of lr multipliers)."""
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return jax.tree.unflatten(jax.tree.structure(params),
                              [fn(declared_axes(v)) for v in variables])


def axes_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The one placement rule, from logical axes to mesh axes. ``layers`` is never split (the
    scan slices it); ``experts`` goes on ``expert`` when that axis has several devices;
    fsdp splits a matrix (two or more dimensions besides ``layers``) along its largest other
    dimension divisible by the axis size."""
    spec: list[Any] = [None] * len(shape)
    expert_size, fsdp_size = mesh.shape["expert"], mesh.shape["fsdp"]
    free = [d for d, a in enumerate(axes) if a != LAYERS]
    if expert_size > 1 and EXPERTS in axes:
        d = axes.index(EXPERTS)
        if shape[d] % expert_size:
            raise ConfigError(f"--mesh expert={expert_size}: {shape[d]} experts cannot be "
                              f"split over {expert_size} devices; choose an expert axis size "
                              "that divides n_experts * m_sub_experts")
        spec[d] = "expert"
    # fsdp splits matrices only: a vector is a rounding error of the state, and gathering
    # one would cost a collective per layer for nothing
    if fsdp_size > 1 and len(free) >= 2:
        dims = [d for d in free if spec[d] is None and shape[d] % fsdp_size == 0]
        if dims:  # the largest divisible dimension; small odd vectors stay replicated
            spec[max(dims, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, config=None):
    """NamedShardings for the parameters (an nnx.State of Params), or for optimizer state
    built from them: optax maps over the Params, so each moment is a Param carrying its
    parameter's declared axes and gets its parameter's spec. Scalars (the step count) are
    replicated; any other array without declared axes is an error. The result keeps the
    tree's Variables (with their axes). ``config``: unused, the axes say everything."""
    def one(x):
        if _is_variable(x):
            spec = axes_spec(declared_axes(x), tuple(x.get_value().shape), mesh)
            return jax.tree.map(lambda _: NamedSharding(mesh, spec), x)
        if getattr(x, "shape", ()) == ():
            return NamedSharding(mesh, P())
        raise ValueError(f"an array of shape {x.shape} outside any parameter: no declared "
                         "logical axes to place it by")

    return jax.tree.map(one, tree, is_leaf=_is_variable)


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


def compute_dtypes(module, default) -> dict[tuple, Any]:
    """The dtype each parameter of ``module`` is computed in, as its own module declares it:
    a module's ``dtype`` (nnx.Linear: bf16, the fp32 router, fp32 norms), else its ``opts.dtype``
    (raw parameters such as the MoE experts', cast at use), else the parameter's own."""
    owners = {path: node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            owner = owners.get(tuple(path[:-1]))
            dtype = getattr(owner, "dtype", None) or getattr(getattr(owner, "opts", None),
                                                                 "dtype", None) or default
            out[tuple(path)] = dtype
    return out


class Placement:
    """Where fsdp weights are gathered, from the parameters' NamedShardings. Called on each
    layer just before it runs (the ``place_layer`` option, inside the layer scan): each
    fsdp-split weight is cast to the dtype it is computed in and gathered whole (expert splits
    kept), so the layer's matmuls run on the device's own rows. Unconstrained, XLA's
    partitioner gathered activations instead (16x the bytes). :meth:`outside_layers` gathers the
    weights outside the layers (embeddings, the tied head) once per micro-batch in their own
    dtype: the lookup reads fp32, and one fp32 gather replaces a bf16 gather per loss chunk
    plus an fp32 one for the lookup. Each gather's gradient is a reduce-scatter.

    Each device runs its own slice (inside the step's shard_map, replicas.py): the gather is
    ``all_gather`` over ``fsdp`` and its gradient an fp32 ``psum_scatter``, as torch FSDP
    with ``reduce_dtype=float32``."""

    def __init__(self, param_sharding):
        self.layers, self.top, self.mesh = {}, {}, None
        flat = jax.tree_util.tree_flatten_with_path(param_sharding, is_leaf=_is_variable)[0]
        for path, var in flat:
            keys, s, axes = tuple(str(_key(k)) for k in path), var.get_value(), declared_axes(var)
            if "fsdp" not in s.spec:
                continue
            self.mesh = s.mesh
            if LAYERS in axes:  # the layer's slice (path below the stack), without that axis
                d = axes.index(LAYERS)
                self.layers[keys[1:]] = P(*s.spec[:d], *s.spec[d + 1:])
            else:
                self.top[keys] = s.spec

    def _gather(self, module, specs, dtypes):
        for path, param in nnx.iter_graph(module):
            spec = specs.get(tuple(str(k) for k in path))
            if spec is None or not isinstance(param, nnx.Param):
                continue
            value = param[...]
            dtype = jnp.dtype(dtypes.get(tuple(path)) or value.dtype)
            param.set_value(self._whole(value, spec, dtype))  # per device: a new shape

    def _whole(self, value, spec, dtype):
        return _all_gather(value, dtype.name, list(spec).index("fsdp"))

    def __call__(self, block, x):
        self._gather(block, self.layers, compute_dtypes(block, None))
        return x

    def remat_policy(self, base):
        """The layer's remat policy with fsdp: ``base`` (None: save everything) except the
        gathered weights, which the backward pass gathers again (as torch FSDP reshards after
        forward) instead of keeping every layer's whole weights until then."""
        def policy(prim, *args, **params):
            if prim.name == "all_gather":
                return False
            return True if base is None else base(prim, *args, **params)

        return policy

    def outside_layers(self, params):
        """``params`` (the model's nnx.State) with the weights outside the layers gathered."""
        def one(path, value):
            keys = tuple(str(_key(k)) for k in path if _key(k) != "value")
            spec = self.top.get(keys)
            return value if spec is None else self._whole(value, spec, value.dtype)

        return jax.tree_util.tree_map_with_path(one, params)


def layer_placement(param_sharding) -> Placement | None:
    """The fsdp :class:`Placement` of these parameters; None when nothing is split on fsdp."""
    placement = Placement(param_sharding)
    return placement if placement.mesh is not None else None


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _all_gather(w, dtype, dim):
    """One device's shard of ``w`` gathered whole over ``fsdp`` in ``dtype`` (inside a
    shard_map); its gradient reduce-scattered in fp32. A custom JVP, not a VJP: the tangent is
    gathered in fp32 and then cast, so its transpose casts the cotangent up and reduce-scatters
    in fp32; and the gather stays an ordinary ``all_gather`` that a remat policy can decline
    to save (:meth:`Placement.remat_policy`; jax keeps a custom VJP's outputs whatever the
    policy)."""
    return jax.lax.all_gather(w.astype(dtype), "fsdp", axis=dim, tiled=True)


@_all_gather.defjvp
def _all_gather_jvp(dtype, dim, primals, tangents):
    (w,), (t,) = primals, tangents
    out = jax.lax.all_gather(w.astype(dtype), "fsdp", axis=dim, tiled=True)
    return out, jax.lax.all_gather(t.astype(jnp.float32), "fsdp", axis=dim,
                                   tiled=True).astype(out.dtype)
