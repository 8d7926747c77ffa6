"""JAX checkpoints with orbax: ``<log_dir>/checkpoints/<step>/`` holding ``params``,
``opt_state`` (training only) and ``meta`` (step, data position, model type, config,
tokenizer). A step folder appears only once complete (orbax's atomic finalisation).

``load_model(path)`` accepts a run's log folder (its newest checkpoint), a ``checkpoints``
folder or one step folder, and rebuilds the model from the config stored beside the weights.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from nanomoe.config import config_from_dict, config_to_dict, model_type_of
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.files import check_regular_file, is_special, refuse_special_files
from nanomoe.weight_checks import check_finite_arrays, non_finite_error

from . import model_class
from .quiet import writer_echoes_muted
from .weights import export_arrays

CHECKPOINTS = "checkpoints"


def manager(directory: str, keep: int | None = None, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr, step: int, params, meta: dict, opt_state: Any = None) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mngr.save(step, args=ocp.args.Composite(**items))


def restore(mngr, step: int, params_like, opt_state_like: Any = None) -> dict:
    """``{'params', 'meta'}`` (+ ``'opt_state'`` when a template is given) of ``step``."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    items = {"params": ocp.args.StandardRestore(abstract(params_like)),
             "meta": ocp.args.JsonRestore()}
    if opt_state_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state_like))
    return dict(mngr.restore(step, args=ocp.args.Composite(**items)).items())


def resolve(path: str) -> tuple[str, int]:
    """(checkpoints folder, step) for a log folder, a checkpoints folder or a step folder.

    Every loader opens a checkpoint through here, so here a FIFO, socket or device anywhere
    in the checkpoints folder (orbax reads every step's metadata, symlinked folders
    followed) is refused before orbax could block on it."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        if is_special(path):
            check_regular_file(path, "checkpoint", ConversionError)
        raise ConversionError(f"{path}: no such checkpoint folder")
    if re.fullmatch(r"\d+", os.path.basename(path)):
        refuse_special_files(os.path.dirname(path), "checkpoint file", ConversionError)
        return os.path.dirname(path), int(os.path.basename(path))
    folder = path if os.path.basename(path) == CHECKPOINTS else os.path.join(path, CHECKPOINTS)
    steps = []
    if os.path.isdir(folder):
        refuse_special_files(folder, "checkpoint file", ConversionError)
        steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit())
    if not steps:
        raise ConversionError(f"{path}: holds no complete JAX checkpoint (expected "
                              f"{CHECKPOINTS}/<step>/ folders)")
    return folder, steps[-1]


def read_meta(path: str) -> dict:
    folder, step = resolve(path)
    mngr = manager(folder, async_save=False)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
        detail = (str(e).splitlines() or [""])[0][:160]
        raise ConversionError(f"{folder}/{step}: could not read the checkpoint's meta "
                              f"({type(e).__name__}: {detail}); the folder is damaged") from None
    finally:
        mngr.close()
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ConversionError(f"{folder}/{step}: its meta holds no model config; the folder is "
                              "damaged or was not written by nanomoe")
    return meta


def load_model(path: str, **options) -> tuple[nnx.Module, dict]:
    """The model stored at ``path`` (see module doc) and its meta; ``options``: see Options."""
    folder, step = resolve(path)
    meta = read_meta(path)
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as e:
        raise ConversionError(f"{folder}/{step}: its meta's config does not work ({e}); the "
                              "folder is damaged") from None
    abstract = nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(0), **options))
    graphdef, params_like = nnx.split(abstract, nnx.Param)
    mngr = manager(folder, async_save=False)
    try:
        with writer_echoes_muted():  # the same threads log and echo as after a failed write
            restored = restore(mngr, step, params_like)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        detail = detail.split(". Truncating")[0][:200]  # not orbax's advice on its options
        raise ConversionError(f"{folder}/{step}: could not restore the weights ({detail}); "
                              "its meta's config does not fit them, or the folder is "
                              "damaged") from None
    finally:
        mngr.close()
    model = nnx.merge(graphdef, restored["params"])
    check_finite(model, path)
    return model, meta


def check_finite(model: nnx.Module, where: str) -> None:
    """Refuse NaN/inf weights where the checkpoint can be named (sampling, conversion,
    --init_from), rather than sample noise from them or let training report a learning-rate
    problem. One reduction over the arrays already loaded; only when it fails are the weights
    exported under the original's keys, so the sentence is the one a .pt file gets (see
    nanomoe.weight_checks.non_finite_error), naming the same key python -m conversion would."""
    leaves = [x for x in jax.tree.leaves(nnx.state(model, nnx.Param))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves or bool(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))):
        return
    check_finite_arrays(export_arrays(model), where)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # not exported (none is)
        if not bool(jnp.isfinite(value.get_value()).all()):
            raise non_finite_error(where, ".".join(map(str, path)))


def save_model(model: nnx.Module, out: str, step: int = 0, meta: dict | None = None) -> str:
    """Write ``model`` as a JAX checkpoint that load_model, --init_from and the sampler read."""
    meta = {"step": step, "model_type": model_type_of(model.config),
            "config": config_to_dict(model.config), **(meta or {})}
    mngr = manager(os.path.join(out, CHECKPOINTS), async_save=False)
    with writer_echoes_muted():
        try:
            save(mngr, step, nnx.state(model, nnx.Param), meta)
            mngr.wait_until_finished()
        finally:
            mngr.close()
    return os.path.join(out, CHECKPOINTS, str(step))


__all__ = ["load_model", "save_model", "check_finite", "read_meta", "resolve", "manager", "save",
           "restore", "jnp"]
