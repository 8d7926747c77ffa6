"""The PyTorch reference against the original (docs/original.md): key tables, parameter counts,
forward structure, losses, checkpoint key prefixes. The math by hand: test_torch_by_hand.py."""

import pytest
import torch
import torch.nn.functional as F

import nanomoe
import nanomoe_torch
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig
from torch_cases import CONFIGS, PARAMS, random_model, random_tokens


# state_dict keys and shapes, written out from the original's modules (its names, (out, in))


def gpt_table(c):
    C, V = c.n_embd, c.vocab_size
    t = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (c.block_size, C)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        t.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    t.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,),
              "lm_head.weight": (V, C)})
    return t


def linear(t, name, n_out, n_in, bias):
    t[name + ".weight"] = (n_out, n_in)
    if bias:
        t[name + ".bias"] = (n_out,)


def modern_table(c):
    C, V, H, b = c.n_embd, c.vocab_size, c.ffn_factor * c.n_embd, c.use_bias
    hd = C // c.n_head
    t = {"wte.weight": (V, C)}
    for i in range(c.n_layer):
        p = f"h.{i}."
        t[p + "ln1.weight"] = t[p + "ln2.weight"] = (C,)
        linear(t, p + "attn.c_qkv", (c.n_head + 2 * c.n_kv_head) * hd, C, b)
        linear(t, p + "attn.out_proj", C, C, b)
        if c.use_gate_proj:
            linear(t, p + "mlp.gate_proj", H, C, b)
            linear(t, p + "mlp.up_proj", H, C, b)
            linear(t, p + "mlp.down_proj", C, H, b)
        else:
            linear(t, p + "mlp.c_fc", 2 * H, C, b)
            linear(t, p + "mlp.c_proj", C, H, b)
    t.update({"ln_f.weight": (C,), "lm_head.weight": (V, C)})
    return t


def moe_table(c):
    C, V, H, b = c.n_embd, c.vocab_size, c.ffn_factor * c.n_embd, c.use_bias
    E, hd = c.n_experts * c.m_sub_experts, C // c.n_head
    t = {"wte.weight": (V, C)}
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        t[p + "ln1.weight"] = t[p + "ln2.weight"] = (C,)
        t[p + "attn.q_norm.weight"] = t[p + "attn.k_norm.weight"] = (hd,)
        linear(t, p + "attn.c_qkv", 3 * C, C, b)
        linear(t, p + "attn.out_proj", C, C, b)
        linear(t, p + "mlp.impl.gate_linear", E, C, b)
        t.update({p + "mlp.impl.fc_weight": (E, H, C), p + "mlp.impl.fc_bias": (E, H),
                  p + "mlp.impl.proj_weight": (E, C, H), p + "mlp.impl.proj_bias": (E, C)})
    t.update({"ln_f.weight": (C,), "lm_head.weight": (V, C)})
    return t


def spec_table(c):
    if isinstance(c, GPTConfig):
        return gpt_table(c)
    return modern_table(c) if isinstance(c, ModernGPTConfig) else moe_table(c)


@pytest.mark.parametrize("config", PARAMS)
def test_state_dict_matches_spec_table(config):
    model = nanomoe_torch.model_class(config)(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_table(config)
    assert not any("rope_cache" in k for k in got)


def test_spec_table_examples():
    # spot checks of the table functions themselves against literal rows
    gpt = gpt_table(CONFIGS["gpt"])
    assert gpt["transformer.h.1.attn.c_attn.weight"] == (96, 32)
    assert gpt["transformer.h.0.mlp.c_proj.weight"] == (32, 128)
    assert len(gpt) == 2 + 12 * 2 + 3
    mqa = modern_table(CONFIGS["modern-mqa-glu"])
    assert mqa["h.0.attn.c_qkv.weight"] == ((4 + 2) * 8, 32)
    assert mqa["h.1.mlp.c_fc.weight"] == (128, 32)
    moe = moe_table(CONFIGS["moe-m2-sigmoid"])
    assert moe["blocks.0.mlp.impl.fc_weight"] == (8, 64, 32)
    assert moe["blocks.1.mlp.impl.gate_linear.bias"] == (8,)
    nobias = moe_table(CONFIGS["moe-nobias"])
    assert "blocks.0.attn.c_qkv.bias" not in nobias
    assert "blocks.0.mlp.impl.gate_linear.bias" not in nobias
    assert nobias["blocks.0.mlp.impl.proj_bias"] == (4, 32)


@pytest.mark.parametrize("config", PARAMS)
def test_rope_cache_is_a_non_persistent_buffer(config):
    model = nanomoe_torch.model_class(config)(config)
    buffers = dict(model.named_buffers())
    if isinstance(config, GPTConfig):
        assert not buffers
    else:
        assert buffers and all(k.endswith("rope_cache") for k in buffers)


# ---------------------------------------------------------------------------------------------
# parameter counts


# README's sizes of the default configs, exactly
DEFAULT_SIZES = {GPTConfig: 124_439_808, ModernGPTConfig: 96_485_376, MoeGPTConfig: 67_790_368,
                 nanomoe.nGPTConfig: 151_963_392}


@pytest.mark.parametrize("config_class", list(DEFAULT_SIZES), ids=lambda c: c.__name__)
def test_default_parameter_counts(config_class):
    config = config_class()
    with torch.device("meta"):  # shapes only: no memory, no init
        model = nanomoe_torch.model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_SIZES[config_class]
    assert nanomoe.count_params(config) == DEFAULT_SIZES[config_class]


@pytest.mark.parametrize("config", PARAMS)
def test_count_params_agrees_with_torch(config):
    model = nanomoe_torch.model_class(config)(config)
    assert nanomoe.count_params(config) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# forward structure and losses


@pytest.mark.parametrize("config", PARAMS)
def test_forward_structure(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    plain = model(idx)
    with_targets = model(idx, tgt)
    assert isinstance(plain, tuple) and isinstance(with_targets, tuple)
    assert with_targets[0].shape == (2, 12, config.vocab_size)
    assert torch.equal(plain[0], with_targets[0])
    losses = with_targets[1]
    if isinstance(config, MoeGPTConfig):
        assert len(plain) == 1
        assert set(losses) == {"loss", "ce_loss", "moe_loss"}
        assert all(v.shape == () for v in losses.values())
        expected = losses["ce_loss"] + config.moe_loss_weight * losses["moe_loss"]
        torch.testing.assert_close(losses["loss"], expected, rtol=1e-6, atol=0)
    else:
        assert len(plain) == 2 and plain[1] == {"loss": None}
        assert set(losses) == {"loss"} and losses["loss"].shape == ()


def test_gpt_loss_is_plain_cross_entropy():
    config = CONFIGS["gpt"]
    model = random_model(config)
    idx, tgt = random_tokens(config)
    logits, out = model(idx, tgt)
    expected = F.cross_entropy(logits.reshape(-1, config.vocab_size), tgt.reshape(-1))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [p for p in PARAMS if not p.id.startswith("gpt")])
def test_loss_ignores_minus_one(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    tgt[0, :5] = -1
    tgt[1, 7] = -1
    logits, out = model(idx, tgt)
    key = "ce_loss" if isinstance(config, MoeGPTConfig) else "loss"
    logp = torch.log_softmax(logits.double(), -1)
    keep = tgt >= 0
    expected = -logp[keep].gather(-1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(out[key].double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out[key], F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                  ignore_index=-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [p for p in PARAMS if p.id.startswith("moe")])
def test_moe_loss_is_the_sum_of_layer_balance_losses(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    layer_losses = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: layer_losses.append(o[1]))
             for b in model.blocks]
    _, out = model(idx, tgt)
    for h in hooks:
        h.remove()
    assert len(layer_losses) == config.n_layer
    torch.testing.assert_close(out["moe_loss"], sum(layer_losses), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", PARAMS)
def test_sequence_longer_than_block_size(config):
    model = random_model(config)
    model(torch.zeros(1, config.block_size, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# checkpoints of the original: torch.compile (`_orig_mod.`) and DDP (`module.`) prefixes


@pytest.mark.parametrize("config", [CONFIGS["gpt"], CONFIGS["modern-gqa-gated"],
                                    CONFIGS["moe-nobias"]], ids=["gpt", "modern", "moe"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod.", "module."])
def test_prefixed_state_dict_round_trip(config, prefix):
    source = random_model(config, seed=1)
    saved = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    idx, _ = random_tokens(config)

    target = nanomoe_torch.create_model(config, 99)
    result = target.load_original_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target(idx)[0], source(idx)[0])

    other = nanomoe_torch.create_model(config, 98)
    other.load_state_dict(nanomoe.strip_wrapper_prefixes(saved), strict=True)
    assert torch.equal(other(idx)[0], source(idx)[0])
    embedding = other.transformer.wte if isinstance(config, GPTConfig) else other.wte
    assert other.lm_head.weight.data_ptr() == embedding.weight.data_ptr()


def test_torch_compile_wrapper_keys_load():
    config = CONFIGS["moe"]
    source = random_model(config, seed=3)
    saved = torch.compile(source).state_dict()  # wrapping only: nothing is compiled
    assert all(k.startswith("_orig_mod.") for k in saved)
    target = nanomoe_torch.create_model(config, 0)
    target.load_original_state_dict(saved)
    idx, _ = random_tokens(config)
    assert torch.equal(target(idx)[0], source(idx)[0])


def test_wrong_keys_still_fail_strictly():
    config = CONFIGS["moe"]
    saved = {"_orig_mod." + k: v for k, v in random_model(config).state_dict().items()}
    saved.pop("_orig_mod.blocks.0.mlp.impl.proj_bias")
    with pytest.raises(RuntimeError, match="proj_bias"):
        nanomoe_torch.create_model(config, 0).load_original_state_dict(saved)
