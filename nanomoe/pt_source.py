"""A .pt checkpoint (the original's or ours) read as a checked :class:`Source`: a config and
NumPy arrays under the original's state_dict keys (``nanomoe.init.param_specs`` order, tied
head included). Framework-free, so the samplers of both frameworks check a file exactly as
``python -m conversion`` does (conversion/checkpoints.py reads the other formats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import model_type_of
from .errors import ConversionError
from .init import param_specs, tied_names
from .pt_config import resolve_config
from .pt_files import load_checkpoint_file
from .state_dict import strip_wrapper_prefixes

Log = Callable[[str], None]
MAX_STEP = 2**63 - 1


@dataclass
class Source:
    config: Any
    arrays: dict[str, np.ndarray]  # the original's keys, fp32
    step: int = 0
    meta: dict = field(default_factory=dict)  # extra JAX-checkpoint meta (tokenizer, ...)


def as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
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


def check_model(config, model: str | None, path: str) -> None:
    """``--model``: refuse a checkpoint of another model type."""
    if model and model_type_of(config) != model:
        raise ConversionError(f"{path} holds a {model_type_of(config)} checkpoint, "
                              f"not {model} as asked")


def read_pt(path: str, model: str | None = None, overrides: dict | None = None,
            log: Log = print) -> Source:
    """A .pt file (``{'model', 'config', 'step'}`` or a bare state_dict) as a :class:`Source`;
    its config is ours, the original's, or inferred from the weights (pt_config.py)."""
    ckpt = load_checkpoint_file(path)  # a FIFO or device is refused before opening
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    has_model = isinstance(ckpt.get("model"), dict)
    sd = strip_wrapper_prefixes(ckpt["model"] if has_model else ckpt)
    config, ours = resolve_config(ckpt.get("config") if has_model else None, sd, path,
                                  model, overrides, log)
    arrays = check_arrays(config, {k: as_numpy(v) for k, v in sd.items()}, path)
    meta = {} if ours or config.vocab_size <= 512 else {"tokenizer": "gpt2"}
    step = parse_step(ckpt.get("step"), path) if has_model else 0
    source = Source(config, arrays, step, meta)
    check_model(source.config, model, path)
    return source
