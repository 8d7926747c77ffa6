"""Checkpoint files and folders: the original's .pt files (and ours), JAX checkpoints, our
safetensors folders; the ``to-torch`` / ``from-torch`` verbs; outputs written atomically.

Every verb works on one neutral form, a :class:`Source`: a config and NumPy arrays under the
original's state_dict keys (``nanomoe.init.param_specs`` order, tied head included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from nanomoe.config import MODEL_CONFIGS, config_from_dict, config_to_dict
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.init import param_specs, tied_names
from nanomoe.state_dict import strip_wrapper_prefixes

from .outputs import atomic_output, check_output
from .pt_config import infer_fields, model_type_from_keys, resolve_config  # noqa: F401
from .pt_files import load_checkpoint_file, load_state_dict_file, read_config_json

__all__ = ["atomic_output", "check_output", "load_checkpoint_file", "load_state_dict_file",
           "load_source", "init_arrays", "to_torch", "from_torch", "Source"]

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# weights checked against their config (which pt_config.py resolves)


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def check_arrays(config, arrays: dict, where: str) -> dict[str, np.ndarray]:
    """``arrays`` (the original's keys) checked against ``config``'s model, in its key order."""
    specs = param_specs(config)
    missing = [k for k in specs if k not in arrays]
    unexpected = [k for k in arrays if k not in specs]
    wrong = [f"{k} {tuple(arrays[k].shape)} != {specs[k].shape}" for k in specs
             if k in arrays and tuple(arrays[k].shape) != specs[k].shape]
    if missing or unexpected or wrong:
        first = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
                 + wrong)[0]
        raise ConversionError(f"{where}: weights do not fit {type(config).__name__} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, "
                              f"{len(wrong)} mis-shaped keys; first: {first})")
    lm_head, embedding = tied_names(config)
    if not np.array_equal(arrays[lm_head], arrays[embedding]):
        raise ConversionError(f"{where}: {lm_head} differs from {embedding}, but the model "
                              "ties them")
    check_finite(arrays, where)
    return {k: arrays[k] for k in specs}


def check_finite(arrays: dict, where: str) -> None:
    """Refuse NaN/inf weights here, where the file can be named, rather than let training
    report them later as a learning-rate problem."""
    for key, value in arrays.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
            raise ConversionError(f"{where}: the weights hold non-finite values (first: {key}); "
                                  "the file is damaged or its run diverged: use an earlier "
                                  "checkpoint")


# ---------------------------------------------------------------------------------------------
# any source -> config + arrays


@dataclass
class Source:
    config: Any
    arrays: dict[str, np.ndarray]  # the original's keys, fp32
    step: int = 0
    meta: dict = field(default_factory=dict)  # extra JAX-checkpoint meta (tokenizer, ...)


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
    if not os.path.isdir(path):  # a .pt file; a FIFO or device is refused before opening
        ckpt = load_checkpoint_file(path)
        if not isinstance(ckpt, dict):
            raise ConversionError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
        has_model = isinstance(ckpt.get("model"), dict)
        sd = strip_wrapper_prefixes(ckpt["model"] if has_model else ckpt)
        config, ours = resolve_config(ckpt.get("config") if has_model else None, sd, path,
                                      model, overrides, log)
        arrays = check_arrays(config, {k: _numpy(v) for k, v in sd.items()}, path)
        meta = {} if ours or config.vocab_size <= 512 else {"tokenizer": "gpt2"}
        return Source(config, arrays, parse_step(ckpt.get("step"), path) if has_model else 0,
                      meta)
    config_json = read_config_json(path)  # not JSON: say so, not "no checkpoint"
    if config_json is not None and not isinstance(config_json.get("model_type", ""), str):
        raise ConversionError(f"{os.path.join(path, 'config.json')}: model_type must be a "
                              f"string such as \"moegpt\", got a "
                              f"{type(config_json['model_type']).__name__}; fix that field or "
                              "export the model again")
    if is_pretrained_folder(path):
        from nanomoe_torch.pretrained import read_pretrained, read_pretrained_metadata

        config, state = read_pretrained(path)
        step = parse_step(read_pretrained_metadata(path).get("step"), path)
        source = Source(config, check_arrays(config, {k: _numpy(v) for k, v in state.items()},
                                             path), step)
    else:
        from nanomoe_jax.checkpoint import load_model

        from .torch_jax import export_arrays

        loaded, meta = load_model(path)
        extra = {k: meta[k] for k in ("tokenizer",) if k in meta}
        source = Source(loaded.config, export_arrays(loaded), parse_step(meta.get("step"), path),
                        extra)
        check_finite(source.arrays, path)
    _check_model(source.config, model, path)
    if overrides:  # e.g. --set double_attn_scale=true on one of our checkpoints
        fields = {**config_to_dict(source.config), **overrides}
        try:
            source.config = config_from_dict(fields)
        except ConfigError as e:
            raise ConversionError(f"--set: {e}") from None
    return source


MAX_STEP = 2**63 - 1


def parse_step(value: Any, path: str) -> int:
    """A checkpoint's recorded step: a non-negative int (or a string of one, as safetensors
    metadata stores it); None is 0; anything else is one sentence."""
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
        return value
    shown = repr(value) if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ConversionError(f"{path}: its recorded step is {shown}, not a whole number "
                          f"from 0 to 2**63-1; the file is damaged or was not written by a "
                          "trainer")


def _check_model(config, model: str | None, path: str) -> None:
    from nanomoe.config import model_type_of

    if model and model_type_of(config) != model:
        raise ConversionError(f"{path} holds a {model_type_of(config)} checkpoint, "
                              f"not {model} as asked")


# ---------------------------------------------------------------------------------------------
# the verbs


def torch_payload(source: Source) -> dict[str, Any]:
    """The original's .pt contents; the tied head is one tensor, as torch.save of the model."""
    import torch

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
    import torch

    from nanomoe_torch.pretrained import write_pretrained

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
    from flax import nnx

    import nanomoe_jax

    from .torch_jax import load_arrays

    cls = nanomoe_jax.model_class(config)
    return load_arrays(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **options)), arrays)


def save_jax(source: Source, out: str, force: bool, meta: dict) -> str:
    from nanomoe_jax.checkpoint import save_model

    model = jax_model(source.config, source.arrays)
    with atomic_output(out, force) as staging:
        save_model(model, staging, source.step, {**source.meta, **meta})
    return os.path.join(out, "checkpoints", str(source.step))


def init_arrays(path: str) -> dict[str, np.ndarray]:
    """Weights for ``train.py --init_from PATH`` in the original's names: a JAX checkpoint, a
    .pt file (the original's or ours), one of our safetensors folders, or Hugging Face GPT-2
    (a local folder, or a hub name such as ``gpt2`` when the hub is reachable)."""
    if not os.path.exists(path) and os.path.lexists(path):
        raise ConversionError(f"--init_from {path}: a link to nothing")
    hf_folder = (os.path.isdir(path) and read_config_json(path) is not None
                 and not is_pretrained_folder(path))
    if os.path.exists(path) and not hf_folder:
        return load_source(path, log=lambda *_: None).arrays
    import tempfile

    from .hf import from_hf

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "imported")
        from_hf(path, out, log=lambda *_: None)
        return load_source(out, log=lambda *_: None).arrays
