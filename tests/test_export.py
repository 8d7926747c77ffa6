"""Export / import: .pt, safetensors, Hugging Face GPT-2 and Llama, the compare verb, refusals."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
import nanomoe_torch
from conversion import hf
from conversion.outputs import atomic_output
from helpers import TINY, jax_twin, random_torch_model, rel_err
from nanomoe import ConversionError, GPTConfig, ModernGPTConfig, MoeGPTConfig, config_to_dict
from nanomoe_jax.checkpoint import load_model, save_model

IDX = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 12))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODERN = {  # every value of kv sharing, bias, MLP form and the double scale appears
    "mqa-bias-glu": ModernGPTConfig(**TINY, n_kv_head=1),
    "mqa-nobias-gated-double": ModernGPTConfig(**TINY, n_kv_head=1, use_bias=False,
                                               use_gate_proj=True, double_attn_scale=True),
    "gqa-bias-gated-double": ModernGPTConfig(**{**TINY, "n_embd": 64}, n_kv_head=2,
                                             use_gate_proj=True, double_attn_scale=True,
                                             rope_scaling=500.0),
    "gqa-nobias-glu": ModernGPTConfig(**TINY, n_kv_head=2, use_bias=False, ffn_factor=3),
}
MODERN_DOUBLE = ModernGPTConfig(**TINY, n_kv_head=2, double_attn_scale=True)
GPT = GPTConfig(**TINY)
MOE = MoeGPTConfig(**TINY, moe_dispatch="dense")
_forward = nnx.jit(lambda model, idx: model(idx)[0])  # one program, not op by op


def jax_model(config, seed=0):
    return jax_twin(random_torch_model(config, seed), dtype=jnp.float32)


def jax_logits(model, idx=IDX):
    return np.asarray(_forward(model, jnp.asarray(idx)))


def saved(model, tmp_path, name="ckpt", step=3):
    save_model(model, str(tmp_path / name), step)
    return str(tmp_path / name)


def assert_same_params(a, b):
    pa, pb = conversion.export_arrays(a), conversion.export_arrays(b)
    assert list(pa) == list(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_gpt_to_hf_matches_jax(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    jm = jax_model(GPT)
    out = conversion.to_hf(saved(jm, tmp_path), str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model) is GPT2LMHeadModel
    with torch.no_grad():
        hf_out = hf_model(torch.from_numpy(IDX)).logits.numpy()
    assert rel_err(hf_out, jax_logits(jm)) <= 1e-5


def test_hf_gpt2_to_jax_matches_hf(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                          n_head=4)).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero bias, no unit norm
        hf_out = hf_model(torch.from_numpy(IDX)).logits.numpy()
    hf_model.save_pretrained(tmp_path / "gpt2")
    conversion.from_hf(str(tmp_path / "gpt2"), str(tmp_path / "jax"))
    jm, meta = load_model(str(tmp_path / "jax"), dtype=jnp.float32)
    assert jm.config == GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32)
    assert rel_err(jax_logits(jm), hf_out) <= 1e-5


@pytest.mark.parametrize("name", list(MODERN))
def test_modern_gpt_to_llama_matches_jax(tmp_path, name):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    jm = jax_model(MODERN[name])
    out = conversion.to_hf(saved(jm, tmp_path), str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model) is LlamaForCausalLM
    assert hf_model.config.num_key_value_heads == MODERN[name].n_kv_head
    with torch.no_grad():
        hf_out = hf_model(torch.from_numpy(IDX)).logits.numpy()
    assert rel_err(hf_out, jax_logits(jm)) <= 1e-5


def test_rope_permutation_maps_interleaved_to_half_split():
    w = np.arange(2 * 8)[:, None]  # 2 heads of hd 8, one column holding the row number
    assert hf.rope_half_split_rows(w, 2)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7,
                                                            8, 10, 12, 14, 9, 11, 13, 15]


def test_moe_to_safetensors_loads_bit_exact_in_torch(tmp_path, capsys):
    jm = jax_model(MOE)
    # nanomoe's own folder (to-hf writes transformers remote code: tests/test_hf_remote.py)
    out = conversion.to_torch(saved(jm, tmp_path), str(tmp_path / "moe"), "safetensors")
    assert "MoeGPTConfig" in capsys.readouterr().out
    tm = nanomoe_torch.MoeGPT.from_pretrained(out)
    for k, v in conversion.torch_state_dict(jm).items():
        assert torch.equal(tm.state_dict()[k], v), k
    assert tm.lm_head.weight is tm.wte.weight  # the tie is restored
    with torch.no_grad():
        assert rel_err(tm(torch.from_numpy(IDX))[0].numpy(), jax_logits(jm)) <= 1e-5
    with pytest.raises(ConversionError, match="not GPTConfig"):
        nanomoe_torch.GPT.from_pretrained(out)


def test_save_pretrained_round_trip(tmp_path):
    tm = random_torch_model(MODERN["gqa-nobias-glu"], seed=3)
    tm.save_pretrained(str(tmp_path / "m"))
    back = nanomoe_torch.ModernGPT.from_pretrained(str(tmp_path / "m"))
    assert back.config == tm.config
    for k, v in tm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("config", [GPT, MODERN_DOUBLE, MOE],
                         ids=["gpt", "moderngpt", "moegpt"])
def test_pt_round_trip_is_bit_exact(tmp_path, config):
    jm = jax_model(config)
    pt = conversion.to_torch(saved(jm, tmp_path, step=7), str(tmp_path / "model.pt"))
    ckpt = torch.load(pt, weights_only=True)
    assert ckpt["config"] == config_to_dict(config) and ckpt["step"] == 7
    nanomoe_torch.model_class(config)(config).load_state_dict(ckpt["model"], strict=True)
    conversion.from_torch(pt, str(tmp_path / "back"))
    back, meta = load_model(str(tmp_path / "back"))
    assert back.config == config and meta["step"] == 7  # ours: double_attn_scale as stored
    assert_same_params(back, jm)
    folder = conversion.to_torch(str(tmp_path / "back"), str(tmp_path / "st"),
                                 format="safetensors")
    assert_same_params(jax_twin(nanomoe_torch.model_class(config).from_pretrained(folder)), jm)


def test_compiled_prefix_and_bare_state_dict_import(tmp_path, capsys):
    config = MODERN["mqa-bias-glu"]
    tm = random_torch_model(config, seed=4)
    sd = {f"_orig_mod.{k}": v for k, v in tm.state_dict().items()}
    torch.save({"model": sd, "config": config_to_dict(config), "step": 5}, tmp_path / "c.pt")
    conversion.from_torch(str(tmp_path / "c.pt"), str(tmp_path / "a"))
    back, meta = load_model(str(tmp_path / "a"))
    assert meta["step"] == 5 and back.config == config
    assert_same_params(back, jax_twin(tm))
    # no config at all: shapes give most fields, --set the rest; then it is the original's
    torch.save(sd, tmp_path / "bare.pt")
    conversion.from_torch(str(tmp_path / "bare.pt"), str(tmp_path / "b"),
                          overrides={"n_head": 4, "block_size": 32})
    back, _ = load_model(str(tmp_path / "b"))
    assert back.config == dataclasses.replace(config, double_attn_scale=True)
    assert "has no config" in capsys.readouterr().out


def test_original_pickled_config_imports_with_double_scale(tmp_path, capsys):
    # the original's config dataclass, from a module that is gone when the file is read
    module = tmp_path / "orig_nano_moe_model.py"
    module.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        @dataclass
        class ModernGPTConfig:
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
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import orig_nano_moe_model as orig

        config = MODERN["mqa-bias-glu"]
        orig_config = orig.ModernGPTConfig(**{k: v for k, v in dataclasses.asdict(config).items()
                                              if k != "double_attn_scale"})
        tm = random_torch_model(config, seed=5)
        sd = {f"_orig_mod.{k}": v for k, v in tm.state_dict().items()}
        torch.save({"model": sd, "config": orig_config, "step": 5000}, tmp_path / "orig.pt")
    finally:
        sys.modules.pop("orig_nano_moe_model", None)
        sys.path.remove(str(tmp_path))
        module.unlink()
    conversion.from_torch(str(tmp_path / "orig.pt"), str(tmp_path / "jax"))
    printed = capsys.readouterr().out
    assert "pickled ModernGPTConfig (the original's)" in printed
    assert "double_attn_scale=True" in printed
    back, meta = load_model(str(tmp_path / "jax"))
    assert back.config == dataclasses.replace(config, double_attn_scale=True)
    assert meta["step"] == 5000
    assert_same_params(back, jax_twin(tm))


def _nothing_new(tmp_path, before):
    assert sorted(os.listdir(tmp_path)) == before  # no output, no staging folder left


def test_wrong_inputs_fail_without_output(tmp_path):
    pt = conversion.to_torch(saved(jax_model(GPT), tmp_path), str(tmp_path / "gpt.pt"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConversionError, match="holds a gpt checkpoint, not moegpt"):
        conversion.from_torch(pt, str(tmp_path / "x"), model="moegpt")
    with pytest.raises(ConversionError, match="no such"):
        conversion.from_torch(str(tmp_path / "missing.pt"), str(tmp_path / "x"))
    with pytest.raises(ConversionError, match="no such"):
        conversion.to_hf(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(ConversionError, match="already exists"):
        conversion.to_torch(str(tmp_path / "ckpt"), pt)
    _nothing_new(tmp_path, before)
    # a failure inside the write leaves nothing behind, and is one sentence naming it
    with pytest.raises(ConversionError, match=r"could not write .*x \(RuntimeError: disk full\)"):
        with atomic_output(str(tmp_path / "x")) as staging:
            os.makedirs(staging)
            raise RuntimeError("disk full")
    _nothing_new(tmp_path, before)
    conversion.to_torch(str(tmp_path / "ckpt"), pt, force=True)  # --force replaces
    _nothing_new(tmp_path, before)


def test_configs_the_other_side_cannot_express_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config = MODERN["mqa-bias-glu"]
    good = hf.llama_config(config)
    hf.check_llama(config, good)
    # an older transformers without mlp_bias would drop the MLP biases: refused
    old = types.SimpleNamespace(**{k: v for k, v in good.to_dict().items() if k != "mlp_bias"})
    with pytest.raises(ConversionError, match="cannot express.*mlp_bias=True"):
        hf.check_llama(config, old)
    # GPT-2 variants our GPT cannot run: another MLP width, another activation
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=4,
                               n_inner=48, activation_function="relu")).save_pretrained(
        tmp_path / "odd")
    LlamaForCausalLM(hf.llama_config(config)).save_pretrained(tmp_path / "llama")
    assert isinstance(LlamaConfig.from_pretrained(tmp_path / "llama"), LlamaConfig)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConversionError, match="activation_function='relu', n_inner=48"):
        conversion.from_hf(str(tmp_path / "odd"), str(tmp_path / "x"))
    with pytest.raises(ConversionError, match="'llama' model; from-hf imports GPT-2"):
        conversion.from_hf(str(tmp_path / "llama"), str(tmp_path / "x"))
    _nothing_new(tmp_path, before)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "conversion", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_export_compare_and_a_clear_failure(tmp_path):
    ckpt = saved(jax_model(MODERN_DOUBLE), tmp_path)
    conversion.to_hf(ckpt, str(tmp_path / "hf"))  # in-process: each CLI run costs seconds
    r = _cli("compare", ckpt, str(tmp_path / "hf"), "--tokens", "1,5,9,33,70,2",
             "--tolerance", "1e-5")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement = 100.0%" in r.stdout and "OK" in r.stdout
    r = _cli("to-torch", ckpt, "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "already exists" in r.stderr


def test_hub_name_offline_fails_in_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError) as err:
        conversion.from_hf("nanomoe-tests/no-such-gpt2", str(tmp_path / "g"))
    assert str(err.value).startswith("could not get 'nanomoe-tests/no-such-gpt2'")
    assert "\n" not in str(err.value) and not (tmp_path / "g").exists()


def test_compare_reports_a_mismatch(tmp_path):
    a = saved(jax_model(GPT, seed=0), tmp_path, "a")
    pt = conversion.to_torch(saved(jax_model(GPT, seed=1), tmp_path, "b"), str(tmp_path / "b.pt"))
    result = conversion.compare(a, pt, tokens=[3, 1, 4, 1, 5], log=lambda s: None)
    assert not result["ok"] and result["kl"] > 0
    same = conversion.compare(a, conversion.to_torch(a, str(tmp_path / "a.pt")),
                              tokens=[3, 1, 4, 1, 5], log=lambda s: None)
    assert same["ok"] and same["top1"] == 1.0
