"""Loading the original's state_dicts and the shared NumPy init into the reference models, and
nanomoe's own Hugging-Face-style folders: ``model.safetensors`` + ``config.json``.

safetensors (the hf extra) is imported where a folder is read or written."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import torch

from nanomoe.config import config_from_dict, config_to_dict
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.files import check_regular_file
from nanomoe.init import init_params, tied_names
from nanomoe.pt_files import read_config_json
from nanomoe.state_dict import strip_wrapper_prefixes
from nanomoe.weight_checks import check_tensors

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


class PretrainedMixin:
    """Adds ``from_seed``, a prefix-tolerant strict ``load_original_state_dict`` and
    ``save_pretrained`` / ``from_pretrained`` (a folder with model.safetensors + config.json)."""

    config_class: type

    @classmethod
    def from_seed(cls, config, seed: int | None = None):
        """The model with the framework-free NumPy init of ``seed`` (same as nanomoe_jax).

        ``seed`` defaults to ``config.seed`` where the config has one (MoeGPT), else 1337.
        """
        seed = getattr(config, "seed", 1337) if seed is None else seed
        model = cls(config)
        load_arrays(model, init_params(config, seed))
        return model

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Strictly load a state_dict of the original (``_orig_mod.``/``module.`` keys accepted)."""
        return self.load_state_dict(strip_wrapper_prefixes(state_dict), strict=True)

    def save_pretrained(self, directory: str) -> None:
        """Write ``directory``/model.safetensors and config.json (with ``model_type``)."""
        write_pretrained(directory, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str):
        """The model saved by ``save_pretrained`` (or ``python -m conversion to-hf`` for MoeGPT)."""
        config, state = read_pretrained(directory)
        if not isinstance(config, cls.config_class):
            raise ConversionError(f"{directory} holds a {type(config).__name__} model, "
                                  f"not {cls.config_class.__name__}")
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model.eval()


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Strictly load NumPy arrays (original names) into ``model``, keeping the tied weight tied."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)


def write_pretrained(directory: str, config, state: Mapping, metadata: dict | None = None) -> None:
    """Tensors (torch or NumPy, the original's names) of ``config``'s model into ``directory``.
    safetensors refuses shared tensors, so the tied ``lm_head.weight`` is stored once, as the
    embedding, and restored by :func:`read_pretrained`."""
    from safetensors.torch import save_file

    lm_head, _ = tied_names(config)
    tensors = {k: (v if torch.is_tensor(v) else torch.from_numpy(np.array(v))).contiguous()
               for k, v in state.items() if k != lm_head}
    os.makedirs(directory, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata=meta)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config_to_dict(config), f, indent=2)


def _safetensors(path: str, read):
    """``read(path)``, with any damage to the file (a header or offsets that lie, truncation,
    an unknown dtype) as one sentence; the Rust reader may even panic, a BaseException."""
    check_regular_file(path, "safetensors file", ConversionError)
    try:
        return read(path)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as e:  # noqa: BLE001 - SafetensorError, PanicException, OSError
        detail = (str(e).splitlines() or [""])[0][:160]
        raise ConversionError(f"{path}: not a valid safetensors file ({type(e).__name__}: "
                              f"{detail}); export the model again") from None


def read_pretrained(directory: str) -> tuple[object, dict[str, torch.Tensor]]:
    """(config, state_dict with the tie restored) of a folder written by write_pretrained."""
    from safetensors.torch import load_file

    paths = [os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise ConversionError(f"{missing[0]}: no such file (expected a folder written by "
                              "save_pretrained)")
    try:
        config = config_from_dict(read_config_json(directory))
    except ConfigError as e:
        raise ConversionError(f"{paths[0]}: {e}; fix that field or export the model "
                              "again") from None
    state = _safetensors(paths[1], load_file)
    check_tensors(state, paths[1])
    lm_head, embedding = tied_names(config)
    if embedding in state:
        state[lm_head] = state[embedding]
    return config, state


def read_pretrained_metadata(directory: str) -> dict[str, str]:
    from safetensors import safe_open

    def read(path):
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})

    return _safetensors(os.path.join(directory, WEIGHTS_NAME), read)
