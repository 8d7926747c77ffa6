"""Configs: the original's defaults, validation that names the field, dict round trips."""

import dataclasses
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanomoe
from nanomoe import (ConfigError, GPTConfig, ModernGPTConfig, MoeGPTConfig, config_from_dict,
                     config_to_dict)

# The original's defaults (spsanps/build-nano-moe; docs/original.md), written out as the
# independent source, then the fields that are ours.
ORIGINAL_DEFAULTS = {
    GPTConfig: dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    ModernGPTConfig: dict(
        block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_kv_head=1, n_embd=768,
        dropout=0.0, use_bias=True, rope_scaling=10000.0, ffn_factor=2, use_gate_proj=False,
        double_attn_scale=False,
    ),
    MoeGPTConfig: dict(
        block_size=1024, vocab_size=50304, n_layer=8, n_head=8, n_embd=512, dropout=0.0,
        use_bias=True, rope_scaling=10000.0, n_experts=4, m_sub_experts=1, n_shared_experts=1,
        n_activated_experts=2, route_score_func="softmax", route_scale=1.0, ffn_factor=2,
        moe_loss_weight=0.01, moe_impl="parallel", seed=1337,
        moe_dispatch="capacity", capacity_factor=2.0, expert_dim=None,
    ),
}

INT_FIELDS = {
    GPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"],
    ModernGPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                      "ffn_factor"],
    MoeGPTConfig: ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_experts",
                   "m_sub_experts", "n_activated_experts", "ffn_factor"],
}

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", list(ORIGINAL_DEFAULTS), ids=lambda c: c.__name__)
def test_defaults_match_original(cls):
    config = cls()
    expected = ORIGINAL_DEFAULTS[cls]
    assert {f.name for f in dataclasses.fields(cls)} == set(expected)
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), name


def test_core_imports_without_frameworks():
    code = ("import sys; import nanomoe; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'jax')]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_torch_package_reexports_the_same_classes():
    import nanomoe_torch

    assert nanomoe_torch.GPTConfig is nanomoe.GPTConfig
    assert nanomoe_torch.ModernGPTConfig is nanomoe.ModernGPTConfig
    assert nanomoe_torch.MoeGPTConfig is nanomoe.MoeGPTConfig


def _bad_cases():
    cases = [
        (GPTConfig, dict(n_embd=30, n_head=4), "n_embd"),
        (ModernGPTConfig, dict(n_embd=30, n_head=4), "n_embd"),
        (MoeGPTConfig, dict(n_embd=30, n_head=4), "n_embd"),
        (ModernGPTConfig, dict(n_embd=48, n_head=4, n_kv_head=3), "n_kv_head"),
        (ModernGPTConfig, dict(n_embd=48, n_head=4, n_kv_head=8), "n_kv_head"),
        # head size 3 cannot be split into RoPE pairs
        (ModernGPTConfig, dict(n_embd=12, n_head=4, n_kv_head=1), "n_embd"),
        (MoeGPTConfig, dict(n_embd=12, n_head=4), "n_embd"),
        (ModernGPTConfig, dict(rope_scaling=0.0), "rope_scaling"),
        (MoeGPTConfig, dict(rope_scaling=-1.0), "rope_scaling"),
        (MoeGPTConfig, dict(n_activated_experts=0), "n_activated_experts"),
        # routed experts = (4 - 1) * 1 = 3
        (MoeGPTConfig, dict(n_activated_experts=4), "n_activated_experts"),
        # routed experts = (4 - 1) * 2 = 6
        (MoeGPTConfig, dict(m_sub_experts=2, n_activated_experts=7), "n_activated_experts"),
        (MoeGPTConfig, dict(n_experts=6, n_shared_experts=2, m_sub_experts=3,
                            n_activated_experts=13), "n_activated_experts"),
        (MoeGPTConfig, dict(n_shared_experts=4, n_activated_experts=1), "n_shared_experts"),
        (MoeGPTConfig, dict(n_shared_experts=5, n_activated_experts=1), "n_shared_experts"),
        (MoeGPTConfig, dict(n_shared_experts=-1), "n_shared_experts"),
        (MoeGPTConfig, dict(n_shared_experts=1.0), "n_shared_experts"),
        (MoeGPTConfig, dict(n_shared_experts=True), "n_shared_experts"),
        (MoeGPTConfig, dict(route_score_func="relu"), "route_score_func"),
        (MoeGPTConfig, dict(route_score_func="Softmax"), "route_score_func"),
        (MoeGPTConfig, dict(moe_dispatch="sparse"), "moe_dispatch"),
        (MoeGPTConfig, dict(capacity_factor=0.0), "capacity_factor"),
        (MoeGPTConfig, dict(capacity_factor=-1.5), "capacity_factor"),
        (MoeGPTConfig, dict(capacity_factor=float("nan")), "capacity_factor"),
        (MoeGPTConfig, dict(expert_dim=0), "expert_dim"),
        (MoeGPTConfig, dict(expert_dim=True), "expert_dim"),
        (MoeGPTConfig, dict(route_scale=0.0), "route_scale"),
        (MoeGPTConfig, dict(moe_loss_weight=-0.01), "moe_loss_weight"),
        (ModernGPTConfig, dict(dropout=0.1), "dropout"),
        (MoeGPTConfig, dict(dropout=0.1), "dropout"),
        (MoeGPTConfig, dict(moe_impl="chunk"), "moe_impl"),
    ]
    for cls, fields in INT_FIELDS.items():
        for name in fields:
            for value in (0, -1, True, 8.0):
                cases.append((cls, {name: value}, name))
    return [pytest.param(cls, kw, field, id=f"{cls.__name__}-{kw}") for cls, kw, field in cases]


@pytest.mark.parametrize("cls, kwargs, field", _bad_cases())
def test_bad_config_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        cls(**kwargs)
    assert isinstance(info.value, ConfigError)


def test_odd_head_size_is_fine_without_rope():
    assert GPTConfig(n_embd=12, n_head=4).n_embd == 12


@pytest.mark.parametrize("k, ok", [(6, True), (7, False)])
def test_activated_experts_bound_counts_sub_experts(k, ok):
    # (n_experts - n_shared_experts) * m_sub_experts routed experts = 6
    kwargs = dict(n_experts=4, n_shared_experts=1, m_sub_experts=2, n_activated_experts=k)
    if ok:
        assert MoeGPTConfig(**kwargs).n_routed_experts == 6
    else:
        with pytest.raises(ConfigError, match="n_activated_experts"):
            MoeGPTConfig(**kwargs)


def test_negative_seed_is_rejected_when_configured():
    # A negative seed passes validation today but cannot seed the NumPy init (init_params
    # raises NumPy's own "expected non-negative integer", which names no field).
    with pytest.raises(ConfigError, match="seed"):
        MoeGPTConfig(seed=-1)


ROUND_TRIP = [
    GPTConfig(n_layer=3, n_embd=48, n_head=6, vocab_size=100, block_size=64),
    ModernGPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, use_bias=False,
                    use_gate_proj=True, ffn_factor=3, rope_scaling=500.0, double_attn_scale=True),
    MoeGPTConfig(n_layer=2, n_embd=64, n_head=4, n_experts=6, m_sub_experts=2,
                 n_shared_experts=2, n_activated_experts=3, route_score_func="sigmoid",
                 route_scale=2.5, moe_loss_weight=0.1, seed=7, moe_dispatch="ragged",
                 capacity_factor=1.5, use_bias=False),
]
MODEL_TYPES = ["gpt", "moderngpt", "moegpt"]


@pytest.mark.parametrize("config, model_type", list(zip(ROUND_TRIP, MODEL_TYPES)), ids=MODEL_TYPES)
def test_dict_round_trip(config, model_type):
    d = config_to_dict(config)
    assert d["model_type"] == model_type
    assert config_from_dict(d) == config
    assert type(config_from_dict(json.loads(json.dumps(d)))) is type(config)
    assert config_from_dict(json.loads(json.dumps(d))) == config
    no_type = {k: v for k, v in d.items() if k != "model_type"}
    assert config_from_dict(no_type, model_type=model_type) == config
    assert nanomoe.model_type_of(config) == model_type


@pytest.mark.parametrize("config", ROUND_TRIP, ids=MODEL_TYPES)
def test_dict_unknown_key_is_named(config):
    d = {**config_to_dict(config), "n_wizards": 3}
    with pytest.raises(ConfigError, match="n_wizards"):
        config_from_dict(d)


def test_dict_unknown_model_type():
    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({"model_type": "bert"})
    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({"n_layer": 2})


def test_dict_missing_fields_default():
    assert config_from_dict({"model_type": "moegpt", "n_layer": 3}) == MoeGPTConfig(n_layer=3)


def test_dict_values_are_still_validated():
    d = {**config_to_dict(MoeGPTConfig()), "n_activated_experts": 9}
    with pytest.raises(ConfigError, match="n_activated_experts"):
        config_from_dict(d)


CAPACITY_CONFIGS = [
    MoeGPTConfig(),  # routed 3, k 2
    MoeGPTConfig(n_experts=6, n_shared_experts=2, m_sub_experts=2, n_activated_experts=3),
    MoeGPTConfig(n_experts=5, n_shared_experts=0, n_activated_experts=1),
]


@pytest.mark.parametrize("config", CAPACITY_CONFIGS)
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("n_tokens", [1, 7, 64, 1000, 4096])
def test_capacity_formula(config, capacity_factor, n_tokens):
    config = dataclasses.replace(config, capacity_factor=capacity_factor)
    k = config.n_activated_experts
    routed = (config.n_experts - config.n_shared_experts) * config.m_sub_experts
    expected = min(n_tokens, math.ceil(Fraction(capacity_factor) * n_tokens * k / routed))
    assert config.capacity(n_tokens) == expected


@pytest.mark.parametrize("config", CAPACITY_CONFIGS)
@pytest.mark.parametrize("extra", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("n_tokens", [1, 5, 63, 1024])
def test_capacity_never_drops_at_routed_over_k(config, extra, n_tokens):
    routed = (config.n_experts - config.n_shared_experts) * config.m_sub_experts
    cf = routed / config.n_activated_experts + extra
    assert dataclasses.replace(config, capacity_factor=cf).capacity(n_tokens) == n_tokens


# Property test: arbitrary sizes and categorical values either build a config whose
# invariants hold, or raise ConfigError naming a field.
SIZES = st.integers(-2, 12)
POSITIVE_FLOATS = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])


@st.composite
def attention_sizes(draw):
    n_head = draw(SIZES)
    n_embd = draw(st.one_of(SIZES.map(lambda m: m * max(n_head, 1)), st.integers(-2, 100)))
    return dict(n_head=n_head, n_embd=n_embd, n_layer=draw(SIZES), block_size=draw(SIZES),
                vocab_size=draw(SIZES))


def _check_outcome(cls, kwargs, check):
    try:
        config = cls(**kwargs)
    except ConfigError as e:
        message = str(e)
        assert message
        assert message.split(":")[0] in {f.name for f in dataclasses.fields(cls)}, message
        return
    for name in INT_FIELDS[cls]:
        value = getattr(config, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, name
    assert config.n_embd % config.n_head == 0
    check(config)
    assert nanomoe.count_params(config) > 0


@settings(max_examples=200, deadline=None)
@given(attention_sizes())
def test_property_gpt_config(kwargs):
    _check_outcome(GPTConfig, kwargs, lambda c: None)


def _rope_invariants(c):
    assert (c.n_embd // c.n_head) % 2 == 0
    assert c.rope_scaling > 0
    assert c.dropout == 0.0


@settings(max_examples=200, deadline=None)
@given(attention_sizes(), SIZES, SIZES, st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([0.0, 0.1]), st.sampled_from([-1.0, 0.0, 10000.0]))
def test_property_modern_config(sizes, n_kv_head, ffn, bias, gate, double, dropout, rope):
    kwargs = dict(sizes, n_kv_head=n_kv_head, ffn_factor=ffn, use_bias=bias, use_gate_proj=gate,
                  double_attn_scale=double, dropout=dropout, rope_scaling=rope)

    def check(c):
        _rope_invariants(c)
        assert c.n_head % c.n_kv_head == 0

    _check_outcome(ModernGPTConfig, kwargs, check)


@settings(max_examples=200, deadline=None)
@given(attention_sizes(), st.integers(-1, 6), st.integers(-1, 3), st.integers(-1, 6),
       st.integers(-1, 10), SIZES, st.sampled_from(["softmax", "sigmoid", "relu", ""]),
       st.sampled_from(["dense", "capacity", "ragged", "sparse"]),
       st.sampled_from(["parallel", "chunk"]), POSITIVE_FLOATS, POSITIVE_FLOATS,
       st.sampled_from([-0.01, 0.0, 0.01]), st.sampled_from([0.0, 0.1]), st.booleans())
def test_property_moe_config(sizes, n_experts, m_sub, n_shared, k, ffn, func, dispatch, impl,
                             route_scale, capacity_factor, loss_weight, dropout, bias):
    kwargs = dict(sizes, n_experts=n_experts, m_sub_experts=m_sub, n_shared_experts=n_shared,
                  n_activated_experts=k, ffn_factor=ffn, route_score_func=func,
                  moe_dispatch=dispatch, moe_impl=impl, route_scale=route_scale,
                  capacity_factor=capacity_factor, moe_loss_weight=loss_weight,
                  dropout=dropout, use_bias=bias)

    def check(c):
        _rope_invariants(c)
        assert 0 <= c.n_shared_experts < c.n_experts
        routed = (c.n_experts - c.n_shared_experts) * c.m_sub_experts
        assert 1 <= c.n_activated_experts <= routed
        assert c.n_total_experts == c.n_experts * c.m_sub_experts
        assert c.n_shared == c.n_shared_experts * c.m_sub_experts
        assert c.route_score_func in ("softmax", "sigmoid")
        assert c.moe_dispatch in ("dense", "capacity", "ragged")
        assert c.moe_impl == "parallel"
        assert c.route_scale > 0 and c.capacity_factor > 0 and c.moe_loss_weight >= 0
        assert 1 <= c.capacity(37) <= 37

    _check_outcome(MoeGPTConfig, kwargs, check)
