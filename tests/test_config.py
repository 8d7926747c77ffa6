"""Configs: the original's defaults, validation that names the field, dict round trips. Capacity
and the property tests: test_config_invariants.py."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nanomoe
from nanomoe import (ConfigError, GPTConfig, ModernGPTConfig, MoeGPTConfig, config_from_dict,
                     config_to_dict)
from helpers import INT_FIELDS

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
