"""Model configurations: one source of truth for both frameworks.

Field names and defaults are exactly those of the original build-nano-moe (see
``shared/spec/seed-architecture.md``); fields marked *ours* are additions that keep the
original's behaviour at their defaults or only select an implementation. Every config is
validated on construction and raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

MOE_DISPATCH = ("dense", "capacity", "ragged", "grouped", "tokamax")
ROUTE_SCORE_FUNCS = ("softmax", "sigmoid")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _positive_ints(cfg: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(cfg, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive integer, got {value!r}",
        )


def _attention_checks(cfg: Any, n_kv_head: int, rope: bool) -> None:
    _require(
        cfg.n_embd % cfg.n_head == 0,
        "n_embd",
        f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}",
    )
    _require(
        cfg.n_head % n_kv_head == 0,
        "n_kv_head",
        f"n_head={cfg.n_head} must be divisible by n_kv_head={n_kv_head}",
    )
    if rope:
        head_dim = cfg.n_embd // cfg.n_head
        _require(
            head_dim % 2 == 0,
            "n_embd",
            f"head size n_embd/n_head={head_dim} must be even for rotary embeddings",
        )
        _require(
            cfg.rope_scaling > 0,
            "rope_scaling",
            f"the RoPE base must be positive, got {cfg.rope_scaling}",
        )


def _finite_floats(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            _require(math.isfinite(value), f.name, f"must be a finite number, got {value}")


def _dropout_check(cfg: Any) -> None:
    # The original's recipe trains with dropout 0.0; a non-zero value would make the two
    # frameworks' forward passes random and un-comparable, so it is refused, not ignored.
    _require(
        cfg.dropout == 0.0,
        "dropout",
        f"only dropout=0.0 is supported (the original trains with 0.0), got {cfg.dropout}",
    )


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 (124M at the defaults): LayerNorm, learned positions, GELU MLP, tied head."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self) -> None:
        _positive_ints(self, "block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        _attention_checks(self, n_kv_head=1, rope=False)


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
        _positive_ints(
            self, "block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_factor"
        )
        _attention_checks(self, n_kv_head=self.n_kv_head, rope=True)
        _finite_floats(self)
        _dropout_check(self)


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
        _positive_ints(
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
        _attention_checks(self, n_kv_head=self.n_head, rope=True)
        _finite_floats(self)
        _dropout_check(self)
        for name in ("n_shared_experts", "seed"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                f"must be a non-negative integer, got {value!r}",
            )
        _require(
            self.n_shared_experts < self.n_experts,
            "n_shared_experts",
            f"n_shared_experts={self.n_shared_experts} must be smaller than "
            f"n_experts={self.n_experts} so that some experts are routed",
        )
        _require(
            0 < self.n_activated_experts <= self.n_routed_experts,
            "n_activated_experts",
            f"must be between 1 and the number of routed experts "
            f"(n_experts - n_shared_experts) * m_sub_experts = {self.n_routed_experts}, "
            f"got {self.n_activated_experts}",
        )
        _require(
            self.route_score_func in ROUTE_SCORE_FUNCS,
            "route_score_func",
            f"must be one of {ROUTE_SCORE_FUNCS}, got {self.route_score_func!r}",
        )
        _require(self.route_scale > 0, "route_scale", f"must be positive, got {self.route_scale}")
        _require(
            self.moe_loss_weight >= 0,
            "moe_loss_weight",
            f"must be non-negative, got {self.moe_loss_weight}",
        )
        _require(
            self.moe_impl == "parallel",
            "moe_impl",
            f"only the original's default 'parallel' layout is supported, got {self.moe_impl!r} "
            "(choose the JAX dispatch with moe_dispatch instead)",
        )
        _require(
            self.moe_dispatch in MOE_DISPATCH,
            "moe_dispatch",
            f"must be one of {MOE_DISPATCH}, got {self.moe_dispatch!r}",
        )
        _require(
            self.expert_dim is None
            or (isinstance(self.expert_dim, int) and not isinstance(self.expert_dim, bool)
                and self.expert_dim > 0),
            "expert_dim",
            f"must be a positive integer or None, got {self.expert_dim!r}",
        )
        _require(
            self.capacity_factor > 0,
            "capacity_factor",
            f"must be positive, got {self.capacity_factor}",
        )

    # Derived sizes, named as in the spec: E, S, k, H.
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
        _positive_ints(self, "block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        _attention_checks(self, n_kv_head=self.n_head, rope=False)
        head_dim = self.n_embd // self.n_head
        _require(head_dim % 2 == 0, "n_embd",
                 f"head size n_embd/n_head={head_dim} must be even for rotary embeddings")
        _finite_floats(self)
        _dropout_check(self)
        _require(self.base_scale > 0, "base_scale", f"must be positive, got {self.base_scale}")


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
    return cls(**{k: _typed(cls, k, v) for k, v in d.items()})


# config_from_dict's bounds: no model here comes near them; far past them a value is damage
# (block_size=10**12 would ask for a 7 TiB RoPE table).
_INT_LIMITS = {"block_size": 2**20, "seed": 2**32 - 1}
_INT_LIMIT = 2**31 - 1


def _typed(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` declares it (bool a real bool; int not a bool;
    float an int or float; str), else ConfigError naming the field."""
    import typing

    kind = typing.get_type_hints(cls)[name]
    options = typing.get_args(kind) if typing.get_origin(kind) is not Literal else ()
    if type(None) in options:
        if value is None:
            return None
        kind = next(o for o in options if o is not type(None))
    shown = repr(value) if isinstance(value, (bool, int, float, str, type(None))) else \
        f"a {type(value).__name__}"
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    if kind is bool:
        _require(isinstance(value, bool), name, f"must be true or false, got {shown}")
    elif kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name,
                 f"must be an integer, got {shown}")
        limit = _INT_LIMITS.get(name, _INT_LIMIT)
        _require(value <= limit, name, f"must be at most {limit}, got {shown}")
    elif kind is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                 and abs(value) < 1e300, name, f"must be a number, got {shown}")
        value = float(value)
    elif kind is str or typing.get_origin(kind) is Literal:
        _require(isinstance(value, str), name, f"must be a string, got {shown}")
    return value
