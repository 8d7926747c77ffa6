"""What makes a config field ill-formed: the checks each config class runs on construction,
and the typed read of one field from a mapping (``config_from_dict``).

Each failure raises :class:`ConfigError` naming the field. Range checks on a config built from
the command line (and the memory it needs) are ``config_checks.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from .errors import ConfigError

# typed_value's bounds: no model here comes near them; far past them a value is damage
# (block_size=10**12 would ask for a 7 TiB RoPE table).
INT_LIMITS = {"block_size": 2**20, "seed": 2**32 - 1}
INT_LIMIT = 2**31 - 1


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_ints(cfg: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(cfg, name)
        require(_is_int(value) and value > 0, name, f"must be a positive integer, got {value!r}")


def attention_checks(cfg: Any, n_kv_head: int, rope: bool) -> None:
    require(
        cfg.n_embd % cfg.n_head == 0,
        "n_embd",
        f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}",
    )
    require(
        cfg.n_head % n_kv_head == 0,
        "n_kv_head",
        f"n_head={cfg.n_head} must be divisible by n_kv_head={n_kv_head}",
    )
    if rope:
        even_head_dim(cfg)
        require(
            cfg.rope_scaling > 0,
            "rope_scaling",
            f"the RoPE base must be positive, got {cfg.rope_scaling}",
        )


def even_head_dim(cfg: Any) -> None:
    head_dim = cfg.n_embd // cfg.n_head
    require(
        head_dim % 2 == 0,
        "n_embd",
        f"head size n_embd/n_head={head_dim} must be even for rotary embeddings",
    )


def finite_floats(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            require(math.isfinite(value), f.name, f"must be a finite number, got {value}")


def dropout_check(cfg: Any) -> None:
    # The original's recipe trains with dropout 0.0; a non-zero value would make the two
    # frameworks' forward passes random and un-comparable, so it is refused, not ignored.
    require(
        cfg.dropout == 0.0,
        "dropout",
        f"only dropout=0.0 is supported (the original trains with 0.0), got {cfg.dropout}",
    )


def expert_counts(cfg: Any) -> None:
    """Shared and activated experts against the experts there are."""
    for name in ("n_shared_experts", "seed"):
        value = getattr(cfg, name)
        require(_is_int(value) and value >= 0, name,
                f"must be a non-negative integer, got {value!r}")
    require(
        cfg.n_shared_experts < cfg.n_experts,
        "n_shared_experts",
        f"n_shared_experts={cfg.n_shared_experts} must be smaller than "
        f"n_experts={cfg.n_experts} so that some experts are routed",
    )
    require(
        0 < cfg.n_activated_experts <= cfg.n_routed_experts,
        "n_activated_experts",
        f"must be between 1 and the number of routed experts "
        f"(n_experts - n_shared_experts) * m_sub_experts = {cfg.n_routed_experts}, "
        f"got {cfg.n_activated_experts}",
    )


def one_of(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    require(value in choices, name, f"must be one of {choices}, got {value!r}")


def router_weights(cfg: Any) -> None:
    """The router's scale and balance-loss weight, and the original's one trained layout."""
    require(cfg.route_scale > 0, "route_scale", f"must be positive, got {cfg.route_scale}")
    require(
        cfg.moe_loss_weight >= 0,
        "moe_loss_weight",
        f"must be non-negative, got {cfg.moe_loss_weight}",
    )
    require(
        cfg.moe_impl == "parallel",
        "moe_impl",
        f"only the original's default 'parallel' layout is supported, got {cfg.moe_impl!r} "
        "(choose the JAX dispatch with moe_dispatch instead)",
    )


def dispatch_sizes(cfg: Any) -> None:
    """Our fields that size the experts and their capacity slots."""
    require(
        cfg.expert_dim is None or (_is_int(cfg.expert_dim) and cfg.expert_dim > 0),
        "expert_dim",
        f"must be a positive integer or None, got {cfg.expert_dim!r}",
    )
    require(
        cfg.capacity_factor > 0,
        "capacity_factor",
        f"must be positive, got {cfg.capacity_factor}",
    )


def _shown(value: Any) -> str:
    shown = repr(value) if isinstance(value, (bool, int, float, str, type(None))) else \
        f"a {type(value).__name__}"
    return shown if len(shown) <= 40 else shown[:37] + "..."


def typed_value(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` declares it (bool a real bool; int not a bool;
    float an int or float; str), else ConfigError naming the field."""
    kind = typing.get_type_hints(cls)[name]
    options = typing.get_args(kind) if typing.get_origin(kind) is not Literal else ()
    if type(None) in options:
        if value is None:
            return None
        kind = next(o for o in options if o is not type(None))
    shown = _shown(value)
    if kind is bool:
        require(isinstance(value, bool), name, f"must be true or false, got {shown}")
    elif kind is int:
        require(_is_int(value), name, f"must be an integer, got {shown}")
        limit = INT_LIMITS.get(name, INT_LIMIT)
        require(value <= limit, name, f"must be at most {limit}, got {shown}")
    elif kind is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool)
                and abs(value) < 1e300, name, f"must be a number, got {shown}")
        value = float(value)
    elif kind is str or typing.get_origin(kind) is Literal:
        require(isinstance(value, str), name, f"must be a string, got {shown}")
    return value
