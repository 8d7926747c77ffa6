"""Checkpoint files and folders: the original's .pt files (and ours), JAX checkpoints, our
safetensors folders; the ``to-torch`` / ``from-torch`` verbs; outputs written atomically.

Every verb works on one neutral form, a :class:`Source` (nanomoe/pt_source.py, which reads a
.pt file): a config and NumPy arrays under the original's state_dict keys
(``nanomoe.init.param_specs`` order, tied head included).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from nanomoe.config import MODEL_CONFIGS, config_from_dict, config_to_dict
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.init import tied_names
from nanomoe.pt_source import (Log, Source, as_numpy, check_arrays, check_finite, check_model,
                               parse_step, read_pt)
from nanomoe_jax import model_class
from nanomoe_jax.checkpoint import load_model, save_model
from nanomoe_jax.weights import export_arrays, load_arrays

from .outputs import atomic_output, check_output
from nanomoe.pt_files import read_config_json


def is_pretrained_folder(path: str) -> bool:
    """A folder of ours with config.json naming one of our model types."""
    try:
        config = read_config_json(path) if os.path.isdir(path) else None
    except ConversionError:
        return False
    model_type = (config or {}).get("model_type")
    return isinstance(model_type, str) and model_type in MODEL_CONFIGS


def load_source(path: str, model: str | None = None, overrides: dict | None = None,
                log: Log = print) -> Source:
    """A JAX checkpoint (log folder / checkpoints folder / step folder), a .pt file, or a
    safetensors folder of ours, as a :class:`Source`."""
    if not os.path.exists(path):
        if os.path.lexists(path):
            raise ConversionError(f"{path}: a link to nothing (a broken symlink); give the "
                                  "checkpoint it should point to")
        raise ConversionError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        return read_pt(path, model, overrides, log)
    config_json = read_config_json(path)  # not JSON: say so, not "no checkpoint"
    if config_json is not None and not isinstance(config_json.get("model_type", ""), str):
        raise ConversionError(f"{os.path.join(path, 'config.json')}: model_type must be a "
                              f"string such as \"moegpt\", got a "
                              f"{type(config_json['model_type']).__name__}; fix that field or "
                              "export the model again")
    if is_pretrained_folder(path):
        # torch is optional (JAX-only installs): only a safetensors folder of ours needs it
        from nanomoe_torch.pretrained import read_pretrained, read_pretrained_metadata

        config, state = read_pretrained(path)
        step = parse_step(read_pretrained_metadata(path).get("step"), path)
        source = Source(config, check_arrays(config, {k: as_numpy(v) for k, v in state.items()},
                                             path), step)
    else:
        loaded, meta = load_model(path)
        extra = {k: meta[k] for k in ("tokenizer",) if k in meta}
        source = Source(loaded.config, export_arrays(loaded), parse_step(meta.get("step"), path),
                        extra)
        check_finite(source.arrays, path)
    check_model(source.config, model, path)
    if overrides:  # e.g. --set double_attn_scale=true on one of our checkpoints
        fields = {**config_to_dict(source.config), **overrides}
        try:
            source.config = config_from_dict(fields)
        except ConfigError as e:
            raise ConversionError(f"--set: {e}") from None
    return source


# ---------------------------------------------------------------------------------------------
# the verbs


def torch_payload(source: Source) -> dict[str, Any]:
    """The original's .pt contents; the tied head is one tensor, as torch.save of the model."""
    import torch  # optional (JAX-only installs): only the verbs that write torch files need it

    lm_head, embedding = tied_names(source.config)
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in source.arrays.items()
          if k != lm_head}
    sd[lm_head] = sd[embedding]
    sd = {k: sd[k] for k in source.arrays}
    return {"model": sd, "config": config_to_dict(source.config), "step": source.step}


def to_torch(ckpt: str, out: str, format: str = "pt", force: bool = False,
             model: str | None = None, log: Log = print) -> str:
    """A checkpoint (JAX, .pt or ours) -> the original's .pt (``format='pt'``) or a folder with
    model.safetensors + config.json (``'safetensors'``, read by ``from_pretrained``)."""
    if format not in ("pt", "safetensors"):
        raise ConversionError(f"--format: must be pt or safetensors, got {format!r}")
    check_output(out, force, [ckpt], "pt" if format == "pt" else "folder")
    source = load_source(ckpt, model, log=log)
    import torch  # optional, as in torch_payload

    from nanomoe_torch.pretrained import write_pretrained  # needs torch

    with atomic_output(out, force) as staging:
        if format == "pt":
            torch.save(torch_payload(source), staging)
        else:
            write_pretrained(staging, source.config, source.arrays, {"step": source.step})
    log(f"wrote {out} ({type(source.config).__name__}, step {source.step}, {format})")
    return out


def from_torch(path: str, out: str, model: str | None = None, overrides: dict | None = None,
               force: bool = False, log: Log = print) -> str:
    """A .pt checkpoint (the original's or ours) -> a JAX checkpoint folder at ``out``."""
    check_output(out, force, [path], "jax")
    source = load_source(path, model, overrides, log)
    step_folder = save_jax(source, out, force, {"source": os.path.abspath(path)})
    log(f"wrote {step_folder} ({type(source.config).__name__}, step {source.step})")
    return out


def jax_model(config, arrays: dict, **options):
    """The Flax model of ``config`` holding ``arrays``; built abstractly first, since every
    parameter is then replaced (no init compute)."""
    cls = model_class(config)
    return load_arrays(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **options)), arrays)


def save_jax(source: Source, out: str, force: bool, meta: dict) -> str:
    model = jax_model(source.config, source.arrays)
    with atomic_output(out, force) as staging:
        save_model(model, staging, source.step, {**source.meta, **meta})
    return os.path.join(out, "checkpoints", str(source.step))
