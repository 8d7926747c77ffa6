"""Loading the original's state_dicts and the shared NumPy init into the reference models."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from nanomoe.init import init_params
from nanomoe.state_dict import strip_wrapper_prefixes


class PretrainedMixin:
    """Adds ``from_seed`` and a prefix-tolerant strict ``load_original_state_dict``."""

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


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Strictly load NumPy arrays (original names) into ``model``, keeping the tied weight tied."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
