"""Converters between the Flax models and the PyTorch world (the original's state_dicts)."""

from .names import Rule, rules
from .torch_jax import export_arrays, load_arrays, load_torch_weights, torch_state_dict

__all__ = ["Rule", "rules", "export_arrays", "load_arrays", "load_torch_weights",
           "torch_state_dict"]
