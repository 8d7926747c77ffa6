"""Model configurations: one source of truth for both frameworks.

Field names and defaults are exactly those of the original, spsanps/build-nano-moe
(docs/original.md: its behaviours kept, each linked to its line); fields marked *ours* are
additions that keep the original's behaviour at their defaults or only select an
implementation. Every config is validated on construction (``config_fields.py``) and raises
:class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .config_fields import (attention_checks, dispatch_sizes, dropout_check, even_head_dim,
                            expert_counts, finite_floats, one_of, positive_ints, require,
                            router_weights, typed_value)
from .errors import ConfigError

MOE_DISPATCH = ("dense", "capacity", "ragged", "grouped", "tokamax")
ROUTE_SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 (124M at the defaults): LayerNorm, learned positions, GELU MLP, tied head."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self) -> None:
        positive_ints(self, "block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        attention_checks(self, n_kv_head=1, rope=False)


@dataclass(frozen=True)
class ModernGPTConfig:
    """RMSNorm, interleaved RoPE, multi-/grouped-query attention, a*silu(b) or gated MLP."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 1
    n_embd: int = 768
    dropout: float = 0.0
    use_bias: bool = True
    rope_scaling: float = 10000.0
    ffn_factor: int = 2
    use_gate_proj: bool = False
    # ours: True reproduces the original's attention logits q.k/hd (1/sqrt(hd) applied twice).
    double_attn_scale: bool = False

    def __post_init__(self) -> None:
        positive_ints(
            self, "block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_factor"
        )
        attention_checks(self, n_kv_head=self.n_kv_head, rope=True)
        finite_floats(self)
        dropout_check(self)


@dataclass(frozen=True)
class MoeGPTConfig:
    """DeepSeek-MoE style: fine-grained routed experts, always-on shared experts, top-k."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    use_bias: bool = True
    rope_scaling: float = 10000.0
    n_experts: int = 4
    m_sub_experts: int = 1
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    route_score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    ffn_factor: int = 2
    moe_loss_weight: float = 0.01
    moe_impl: str = "parallel"
    seed: int = 1337
    # ours: how the JAX model dispatches tokens to routed experts (same math, see README).
    moe_dispatch: Literal["dense", "capacity", "ragged", "grouped", "tokamax"] = "capacity"
    # ours: slots per routed expert = ceil(capacity_factor * tokens * k / routed experts),
    # at most tokens. At capacity_factor >= routed_experts / k no token can be dropped.
    capacity_factor: float = 2.0
    # ours: the width H of each expert; None keeps the original's ffn_factor * n_embd. Lets
    # fine-grained experts shrink as their number grows at a fixed active compute.
    expert_dim: int | None = None

    def __post_init__(self) -> None:
        positive_ints(
            self,
            "block_size",
            "vocab_size",
            "n_layer",
            "n_head",
            "n_embd",
            "n_experts",
            "m_sub_experts",
            "n_activated_experts",
            "ffn_factor",
        )
        attention_checks(self, n_kv_head=self.n_head, rope=True)
        finite_floats(self)
        dropout_check(self)
        expert_counts(self)
        one_of(self, "route_score_func", ROUTE_SCORE_FUNCS)
        router_weights(self)
        one_of(self, "moe_dispatch", MOE_DISPATCH)
        dispatch_sizes(self)

    # Derived sizes, with their axis letters in docs/dimensions.md: E, S, R, H.
    @property
    def n_total_experts(self) -> int:
        """E = n_experts * m_sub_experts."""
        return self.n_experts * self.m_sub_experts

    @property
    def n_shared(self) -> int:
        """S = n_shared_experts * m_sub_experts; always the first S expert indices."""
        return self.n_shared_experts * self.m_sub_experts

    @property
    def n_routed_experts(self) -> int:
        """R = E - S, the experts top-k chooses among."""
        return self.n_total_experts - self.n_shared

    @property
    def expert_hidden(self) -> int:
        """H, the width of each expert: expert_dim, else ffn_factor * n_embd (the original)."""
        return self.expert_dim or self.ffn_factor * self.n_embd

    def capacity(self, n_tokens: int) -> int:
        """Slots per routed expert for ``n_tokens`` tokens in the capacity dispatch."""
        k, routed = self.n_activated_experts, self.n_routed_experts
        return max(1, min(n_tokens, math.ceil(self.capacity_factor * n_tokens * k / routed)))


@dataclass(frozen=True)
class nGPTConfig:  # noqa: N801 - the original's class name
    """nGPT ("based on NVIDIA/ngpt"): unit-norm residual stream, learned eigen learning rates,
    tied head. Its quirks (attention scale, half-split rotary map) are reproduced by default."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # A constant, as in the original: 1/sqrt(768) whatever n_embd is (it sets the init std and
    # the starting values of the scale vectors, never follows the width).
    base_scale: float = 1.0 / math.sqrt(768)
    # ours: True uses the nGPT paper's attention scale sqrt(hd) on the unit q, k; the original
    # keeps SDPA's 1/sqrt(hd), which bounds every logit by 1/sqrt(hd).
    paper_attn_scale: bool = False
    # ours: True rotates with the seed's interleaved RoPE (a true rotation); the original's
    # half-split map (not a rotation, output in halves) is the default.
    standard_rope: bool = False

    def __post_init__(self) -> None:
        positive_ints(self, "block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        attention_checks(self, n_kv_head=self.n_head, rope=False)
        even_head_dim(self)
        finite_floats(self)
        dropout_check(self)
        require(self.base_scale > 0, "base_scale", f"must be positive, got {self.base_scale}")


ModelConfig = GPTConfig | ModernGPTConfig | MoeGPTConfig | nGPTConfig

MODEL_CONFIGS: dict[str, type] = {
    "gpt": GPTConfig,
    "moderngpt": ModernGPTConfig,
    "moegpt": MoeGPTConfig,
    "ngpt": nGPTConfig,
}


def model_type_of(config: ModelConfig) -> str:
    for name, cls in MODEL_CONFIGS.items():
        if type(config) is cls:
            return name
    raise ConfigError(f"config: {type(config).__name__} is not one of {sorted(MODEL_CONFIGS)}")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A plain dict (safe for ``torch.load(weights_only=True)`` and JSON) with the model type."""
    return {"model_type": model_type_of(config), **dataclasses.asdict(config)}


def config_from_dict(d: dict[str, Any], model_type: str | None = None) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown fields are an error, missing ones default."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: must be a mapping of fields, got a {type(d).__name__}")
    d = dict(d)
    model_type = d.pop("model_type", model_type)
    if not isinstance(model_type, str) or model_type not in MODEL_CONFIGS:
        raise ConfigError(f"model_type: must be one of {sorted(MODEL_CONFIGS)}, got {model_type!r}"[:300])
    cls = MODEL_CONFIGS[model_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a field of {cls.__name__} (unknown fields: {unknown})"[:300])
    return cls(**{k: typed_value(cls, k, v) for k, v in d.items()})
