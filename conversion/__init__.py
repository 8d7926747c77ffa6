"""Converters between the Flax models and the PyTorch world (the original's state_dicts,
.pt checkpoints, safetensors folders, Hugging Face GPT-2 / Llama). ``python -m conversion``."""

from nanomoe_jax.names import Rule, rules
from nanomoe_jax.weights import export_arrays, load_arrays, load_torch_weights, torch_state_dict

from .checkpoints import from_torch, load_source, to_torch
from .compare import compare
from .hf import from_hf, to_hf

__all__ = ["Rule", "rules", "export_arrays", "load_arrays", "load_torch_weights",
           "torch_state_dict", "to_torch", "from_torch", "to_hf", "from_hf", "compare",
           "load_source"]
