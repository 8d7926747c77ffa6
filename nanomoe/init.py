"""Framework-free initial weights: the same ``--seed`` gives the same arrays in both frameworks.

:func:`param_specs` is the original's parameter table in code (its names and layouts,
PyTorch's (out, in) for Linear weights). :func:`init_params` draws every tensor with NumPy from
a generator seeded by ``(seed, name)``, so a tensor does not depend on the order or on which
other tensors exist. The distributions are those the original really uses
(docs/original.md: MoeGPT's re-drawn out_proj and zero proj_weight, nGPT's base_scale).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .config import GPTConfig, ModelConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig

STD = 0.02
TIED = {"gpt": ("lm_head.weight", "transformer.wte.weight"), "other": ("lm_head.weight", "wte.weight")}


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    init: str  # "normal", "zeros", "ones" or "constant"
    std: float = STD
    value: float = 0.0  # the value of a "constant" tensor


def _linear(specs: dict, name: str, n_in: int, n_out: int, bias: bool, std: float = STD) -> None:
    specs[f"{name}.weight"] = ParamSpec((n_out, n_in), "normal", std)
    if bias:
        specs[f"{name}.bias"] = ParamSpec((n_out,), "zeros")


def _norm(specs: dict, name: str, dim: int, bias: bool = False) -> None:
    specs[f"{name}.weight"] = ParamSpec((dim,), "ones")
    if bias:
        specs[f"{name}.bias"] = ParamSpec((dim,), "zeros")


def _gpt_specs(c: GPTConfig, s: dict[str, ParamSpec]) -> None:
    C, V = c.n_embd, c.vocab_size
    proj_std = STD * (2 * c.n_layer) ** -0.5  # GPT-2's residual-projection scaling
    s["transformer.wte.weight"] = ParamSpec((V, C), "normal")
    s["transformer.wpe.weight"] = ParamSpec((c.block_size, C), "normal")
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        _norm(s, f"{p}.ln_1", C, bias=True)
        _linear(s, f"{p}.attn.c_attn", C, 3 * C, True)
        _linear(s, f"{p}.attn.c_proj", C, C, True, proj_std)
        _norm(s, f"{p}.ln_2", C, bias=True)
        _linear(s, f"{p}.mlp.c_fc", C, 4 * C, True)
        _linear(s, f"{p}.mlp.c_proj", 4 * C, C, True, proj_std)
    _norm(s, "transformer.ln_f", C, bias=True)


def _modern_gpt_specs(c: ModernGPTConfig, s: dict[str, ParamSpec]) -> None:
    C, hd = c.n_embd, c.n_embd // c.n_head
    H, b = c.ffn_factor * C, c.use_bias
    s["wte.weight"] = ParamSpec((c.vocab_size, C), "normal")
    for i in range(c.n_layer):
        p = f"h.{i}"
        _norm(s, f"{p}.ln1", C)
        _linear(s, f"{p}.attn.c_qkv", C, (c.n_head + 2 * c.n_kv_head) * hd, b)
        _linear(s, f"{p}.attn.out_proj", C, C, b)
        _norm(s, f"{p}.ln2", C)
        if c.use_gate_proj:
            _linear(s, f"{p}.mlp.gate_proj", C, H, b)
            _linear(s, f"{p}.mlp.up_proj", C, H, b)
            _linear(s, f"{p}.mlp.down_proj", H, C, b)
        else:
            _linear(s, f"{p}.mlp.c_fc", C, 2 * H, b)
            _linear(s, f"{p}.mlp.c_proj", H, C, b)
    _norm(s, "ln_f", C)


def _moe_gpt_specs(c: MoeGPTConfig, s: dict[str, ParamSpec]) -> None:
    C, hd = c.n_embd, c.n_embd // c.n_head
    E, H, b = c.n_total_experts, c.expert_hidden, c.use_bias
    s["wte.weight"] = ParamSpec((c.vocab_size, C), "normal")
    for i in range(c.n_layer):
        p = f"blocks.{i}"
        _norm(s, f"{p}.ln1", C)
        _norm(s, f"{p}.attn.q_norm", hd)
        _norm(s, f"{p}.attn.k_norm", hd)
        _linear(s, f"{p}.attn.c_qkv", C, 3 * C, b)
        _linear(s, f"{p}.attn.out_proj", C, C, b)
        _norm(s, f"{p}.ln2", C)
        s[f"{p}.mlp.impl.fc_weight"] = ParamSpec((E, H, C), "normal")
        s[f"{p}.mlp.impl.fc_bias"] = ParamSpec((E, H), "zeros")
        # The original re-initialises only nn.Linear modules after building the blocks,
        # so the expert output projection really starts at zero.
        s[f"{p}.mlp.impl.proj_weight"] = ParamSpec((E, C, H), "zeros")
        s[f"{p}.mlp.impl.proj_bias"] = ParamSpec((E, C), "zeros")
        # torch lists a module's own Parameters before its children's: gate_linear last
        _linear(s, f"{p}.mlp.impl.gate_linear", C, E, b)
    _norm(s, "ln_f", C)


def _ngpt_specs(c: nGPTConfig, s: dict[str, ParamSpec]) -> None:
    C, std = c.n_embd, c.base_scale  # every matrix N(0, base_scale^2), output projections too
    s["wte.weight"] = ParamSpec((c.vocab_size, C), "normal", std)
    for i in range(c.n_layer):
        p = f"blocks.{i}"  # the block's own vectors come before its submodules'
        s[f"{p}.attn_alpha"] = ParamSpec((C,), "constant", value=0.05 * std)
        s[f"{p}.mlp_alpha"] = ParamSpec((C,), "constant", value=0.05 * std)
        s[f"{p}.sqk"] = ParamSpec((C,), "constant", value=std)
        s[f"{p}.suv"] = ParamSpec((8 * C,), "constant", value=std)
        _linear(s, f"{p}.c_attn", C, 3 * C, False, std)
        _linear(s, f"{p}.attn_out", C, C, False, std)
        _linear(s, f"{p}.c_mlp", C, 8 * C, False, std)
        _linear(s, f"{p}.mlp_out", 4 * C, C, False, std)
        _norm(s, f"{p}.rms_att", C)
        _norm(s, f"{p}.rms_mlp", C)


# Insertion order is the original's state_dict order (the tied lm_head key goes last).
_SPECS_BY_CONFIG = (
    (GPTConfig, _gpt_specs),
    (ModernGPTConfig, _modern_gpt_specs),
    (MoeGPTConfig, _moe_gpt_specs),
    (nGPTConfig, _ngpt_specs),
)


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of the original's state_dict: name -> shape and initialiser."""
    fill = next((f for cls, f in _SPECS_BY_CONFIG if isinstance(config, cls)), None)
    if fill is None:
        raise TypeError(f"not a model config: {type(config).__name__}")
    s: dict[str, ParamSpec] = {}
    fill(config, s)
    tied, embedding = tied_names(config)
    s[tied] = s[embedding]
    return s


def tied_names(config: ModelConfig) -> tuple[str, str]:
    """(lm_head key, embedding key): the original ties them, so they are one tensor."""
    return TIED["gpt" if isinstance(config, GPTConfig) else "other"]


def _generator(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Initial fp32 weights in the original's names and layouts; lm_head shares wte's array."""
    specs = param_specs(config)
    tied, embedding = tied_names(config)
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if name == tied:
            continue
        if spec.init == "normal":
            arr = _generator(seed, name).standard_normal(spec.shape, dtype=np.float32)
            arr *= np.float32(spec.std)
        elif spec.init == "zeros":
            arr = np.zeros(spec.shape, np.float32)
        elif spec.init == "constant":
            arr = np.full(spec.shape, spec.value, np.float32)
        else:
            arr = np.ones(spec.shape, np.float32)
        out[name] = arr
    out[tied] = out[embedding]
    return out


def count_params(config: ModelConfig, include_embedding_positions: bool = True) -> int:
    """Parameters counting the tied matrix once (GPT-2 124M: 124,439,808)."""
    specs = param_specs(config)
    tied, _ = tied_names(config)
    n = sum(int(np.prod(s.shape)) for k, s in specs.items() if k != tied)
    if not include_embedding_positions and isinstance(config, GPTConfig):
        n -= int(np.prod(specs["transformer.wpe.weight"].shape))
    return n
