"""One table per model: JAX module path <-> the original's state_dict prefix, and the leaf
renames by module kind. Layer-stacked JAX tensors (leading axis L) correspond to the
original's per-layer keys ``...{i}...``. NumPy only; it lives beside the models because
``create_model`` fills them through it (weights.py), and conversion reads it from here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nanomoe.config import GPTConfig, ModelConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.init import param_specs, tied_names

# leaf renames per module kind: torch leaf -> (jax leaf, transpose?)
LINEAR = {"weight": ("kernel", True), "bias": ("bias", False)}  # torch (out, in), JAX (in, out)
EMBED = {"weight": ("embedding", False)}
LAYERNORM = {"weight": ("scale", False), "bias": ("bias", False)}
RMSNORM = {"weight": ("scale", False)}
EXPERTS = {n: (n, False) for n in ("fc_weight", "fc_bias", "proj_weight", "proj_bias")}
NGPT_VECTORS = {n: (n, False) for n in ("attn_alpha", "mlp_alpha", "sqk", "suv")}

# (torch module prefix, JAX module path, kind); "{i}" marks the layer index
GPT_TABLE = [
    ("transformer.wte", "wte", EMBED),
    ("transformer.wpe", "wpe", EMBED),
    ("transformer.h.{i}.ln_1", "blocks.ln1", LAYERNORM),
    ("transformer.h.{i}.attn.c_attn", "blocks.attn.c_qkv", LINEAR),
    ("transformer.h.{i}.attn.c_proj", "blocks.attn.out_proj", LINEAR),
    ("transformer.h.{i}.ln_2", "blocks.ln2", LAYERNORM),
    ("transformer.h.{i}.mlp.c_fc", "blocks.mlp.c_fc", LINEAR),
    ("transformer.h.{i}.mlp.c_proj", "blocks.mlp.c_proj", LINEAR),
    ("transformer.ln_f", "ln_f", LAYERNORM),
]
MODERN_TABLE = [
    ("wte", "wte", EMBED),
    ("h.{i}.ln1", "blocks.ln1", RMSNORM),
    ("h.{i}.attn.c_qkv", "blocks.attn.c_qkv", LINEAR),
    ("h.{i}.attn.out_proj", "blocks.attn.out_proj", LINEAR),
    ("h.{i}.ln2", "blocks.ln2", RMSNORM),
    ("h.{i}.mlp.c_fc", "blocks.mlp.c_fc", LINEAR),
    ("h.{i}.mlp.c_proj", "blocks.mlp.c_proj", LINEAR),
    ("h.{i}.mlp.gate_proj", "blocks.mlp.gate_proj", LINEAR),
    ("h.{i}.mlp.up_proj", "blocks.mlp.up_proj", LINEAR),
    ("h.{i}.mlp.down_proj", "blocks.mlp.down_proj", LINEAR),
    ("ln_f", "ln_f", RMSNORM),
]
MOE_TABLE = [
    ("wte", "wte", EMBED),
    ("blocks.{i}.ln1", "blocks.ln1", RMSNORM),
    ("blocks.{i}.attn.q_norm", "blocks.attn.q_norm", RMSNORM),
    ("blocks.{i}.attn.k_norm", "blocks.attn.k_norm", RMSNORM),
    ("blocks.{i}.attn.c_qkv", "blocks.attn.c_qkv", LINEAR),
    ("blocks.{i}.attn.out_proj", "blocks.attn.out_proj", LINEAR),
    ("blocks.{i}.ln2", "blocks.ln2", RMSNORM),
    ("blocks.{i}.mlp.impl.gate_linear", "blocks.mlp.gate_linear", LINEAR),
    ("blocks.{i}.mlp.impl", "blocks.mlp", EXPERTS),
    ("ln_f", "ln_f", RMSNORM),
]
NGPT_TABLE = [
    ("wte", "wte", EMBED),
    ("blocks.{i}", "blocks", NGPT_VECTORS),
    ("blocks.{i}.c_attn", "blocks.c_attn", LINEAR),
    ("blocks.{i}.attn_out", "blocks.attn_out", LINEAR),
    ("blocks.{i}.c_mlp", "blocks.c_mlp", LINEAR),
    ("blocks.{i}.mlp_out", "blocks.mlp_out", LINEAR),
    ("blocks.{i}.rms_att", "blocks.rms_att", RMSNORM),
    ("blocks.{i}.rms_mlp", "blocks.rms_mlp", RMSNORM),
]


def table(config: ModelConfig) -> list[tuple[str, str, dict]]:
    if isinstance(config, GPTConfig):
        return GPT_TABLE
    if isinstance(config, ModernGPTConfig):
        return MODERN_TABLE
    if isinstance(config, MoeGPTConfig):
        return MOE_TABLE
    if isinstance(config, nGPTConfig):
        return NGPT_TABLE
    raise TypeError(f"not a model config: {type(config).__name__}")


class Rule(NamedTuple):
    jax_path: str          # e.g. "blocks.attn.c_qkv.kernel"
    torch_key: str         # e.g. "h.{i}.attn.c_qkv.weight" ("{i}": one key per layer)
    transpose: bool        # swap the last two axes (Linear weights)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch_key

    def torch_keys(self, n_layer: int) -> list[str]:
        if not self.stacked:
            return [self.torch_key]
        return [self.torch_key.format(i=i) for i in range(n_layer)]


def rules(config: ModelConfig) -> list[Rule]:
    """The rules for every tensor of ``config``'s model, in the original's key order (the tied
    ``lm_head.weight`` is not a rule: it is the embedding)."""
    tied, _ = tied_names(config)
    templates: dict[str, None] = {}
    for key in param_specs(config):
        if key != tied:
            templates[_template(key)] = None
    out = []
    for key in templates:
        out.append(_rule_for(key, table(config)))
    return out


def _template(key: str) -> str:
    parts = key.split(".")
    for j, part in enumerate(parts):
        if part.isdigit() and j > 0 and parts[j - 1] in ("h", "blocks"):
            parts[j] = "{i}"
    return ".".join(parts)


def _rule_for(template: str, rows) -> Rule:
    module, leaf = template.rsplit(".", 1)
    for torch_prefix, jax_prefix, kind in rows:
        if module == torch_prefix and leaf in kind:
            jax_leaf, transpose = kind[leaf]
            return Rule(f"{jax_prefix}.{jax_leaf}", template, transpose)
    raise KeyError(f"no conversion rule for {template}")


def to_jax_layout(arrays: list[np.ndarray], rule: Rule) -> np.ndarray:
    """Per-layer original tensors -> one JAX tensor (stacked on axis 0 when per layer)."""
    if rule.transpose:
        arrays = [a.T for a in arrays]
    return np.stack(arrays) if rule.stacked else arrays[0]


def to_torch_layout(array: np.ndarray, rule: Rule, n_layer: int) -> list[np.ndarray]:
    """One JAX tensor -> the original's tensors, one per key of ``rule.torch_keys``."""
    parts = [array[i] for i in range(n_layer)] if rule.stacked else [array]
    return [np.ascontiguousarray(p.T if rule.transpose else p) for p in parts]
