"""Config invariants: MoE capacity against its formula (exact fractions) and at routed / k,
where it never drops; and property tests where arbitrary sizes and categorical values either
build a config whose invariants hold or raise ConfigError naming a field."""

import dataclasses
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanomoe
from helpers import INT_FIELDS
from nanomoe import ConfigError, GPTConfig, ModernGPTConfig, MoeGPTConfig


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
