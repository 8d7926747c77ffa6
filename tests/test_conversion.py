"""The converters: torch -> JAX -> torch bit-exact, strict loading, clear errors."""

import numpy as np
import pytest
import torch

import conversion
import nanomoe_torch
from nanomoe_jax.names import rules
from helpers import ALL_CONFIGS, jax_twin, random_torch_model
from nanomoe import ConversionError, param_specs
from nanomoe.init import tied_names


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_round_trip_is_bit_exact(name):
    config = ALL_CONFIGS[name]
    tm = random_torch_model(config, seed=9)
    sd = conversion.torch_state_dict(jax_twin(tm))
    assert list(sd) == list(tm.state_dict())  # the original's keys, in its order
    for k, v in tm.state_dict().items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], v), k
    lm_head, embedding = tied_names(config)
    assert sd[lm_head] is sd[embedding]  # saved once by torch.save, as the original's
    fresh = nanomoe_torch.model_class(config)(config)
    fresh.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name", ["gpt", "mqa-glu", "moe-default"])
def test_compiled_and_ddp_prefixes_are_accepted(name):
    config = ALL_CONFIGS[name]
    tm = random_torch_model(config, seed=10)
    prefixed = {f"module._orig_mod.{k}": v for k, v in tm.state_dict().items()}
    jm = jax_twin(random_torch_model(config, seed=99))  # other weights, then the prefixed ones
    exported = conversion.export_arrays(conversion.load_torch_weights(jm, prefixed))
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(exported[k], v.numpy())


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_every_original_key_has_one_rule(name):
    config = ALL_CONFIGS[name]
    n_layer = config.n_layer
    covered = [k for r in rules(config) for k in r.torch_keys(n_layer)]
    lm_head, _ = tied_names(config)
    assert sorted(covered + [lm_head]) == sorted(param_specs(config))
    assert len(covered) == len(set(covered))


def test_mismatches_are_listed_and_nothing_is_written():
    config = ALL_CONFIGS["mqa-glu"]
    tm = random_torch_model(config, seed=11)
    jm = jax_twin(tm)
    before = conversion.export_arrays(jm)
    sd = dict(tm.state_dict())
    del sd["h.0.ln1.weight"], sd["h.1.attn.out_proj.bias"]
    sd["h.0.attn.c_qkv.weight"] = torch.zeros(7, 32)
    sd["h.9.mlp.c_fc.weight"] = torch.zeros(3)
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        conversion.load_torch_weights(jm, sd)
    message = str(err.value)
    for key in ("h.0.ln1.weight", "h.1.attn.out_proj.bias", "h.0.attn.c_qkv.weight",
                "h.9.mlp.c_fc.weight", "extra.thing"):
        assert key in message
    assert "2 missing, 2 unexpected, 1 mis-shaped" in message
    after = conversion.export_arrays(jm)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])  # all-or-nothing


def test_untied_head_is_refused():
    config = ALL_CONFIGS["gpt"]
    tm = random_torch_model(config, seed=12)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    with pytest.raises(ConversionError, match="ties them"):
        conversion.load_torch_weights(jax_twin(random_torch_model(config)), sd)


def test_a_checkpoint_of_another_model_is_refused():
    gpt_sd = random_torch_model(ALL_CONFIGS["gpt"]).state_dict()
    with pytest.raises(ConversionError, match="do not fit MoeGPT"):
        conversion.load_torch_weights(jax_twin(random_torch_model(ALL_CONFIGS["moe-default"])),
                                      gpt_sd)
