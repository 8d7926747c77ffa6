"""nGPT: the original's numeric checks, conversion of its checkpoints, decoding and training in
both frameworks (with and without the paper's weight normalisation).

JAX-vs-torch forward, loss, gradient and bf16 parity, the round trip, causality, remat and the
chunked loss are the shared tests' (nGPT is in ``helpers.ALL_CONFIGS``: tests/test_parity.py,
tests/test_conversion.py, tests/test_jax_models.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
import nanomoe_jax
import nanomoe_torch
from helpers import NGPT_CONFIGS, corpus_fixture, jax_twin, random_torch_model
from nanomoe import ConfigError, count_params, init_params, nGPTConfig, param_specs
from nanomoe.cli import build_config, parse_args
from nanomoe.init import tied_names
from nanomoe.train_loop import run
from nanomoe_jax import ngpt as jax_ngpt
from nanomoe_jax.sample import generate
from nanomoe_train.jax_backend import JaxBackend
from nanomoe_torch import ngpt as torch_ngpt
from nanomoe_torch.sample import generate as torch_generate
from nanomoe_train.torch_backend import TorchBackend

# a check config: base_scale stays 1/sqrt(768) at n_embd 16 (docs/original.md#ngpt)
CHECK = nGPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
CHECK_IDX = np.arange(8).reshape(1, 8)
CONFIGS = NGPT_CONFIGS
TINY = CONFIGS["ngpt"]
jax_call = nnx.jit(lambda m, idx, tgt=None: m(idx) if tgt is None else m(idx, tgt))


def test_config_defaults_size_and_validation():
    c = nGPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (1024, 50257, 12, 12, 768)
    assert c.base_scale == pytest.approx(0.036084391824351615, abs=1e-17)
    assert nGPTConfig(n_embd=64, n_head=2).base_scale == c.base_scale  # a constant
    assert count_params(c) == 151_963_392
    specs = param_specs(c)
    assert len(specs) == 2 + 10 * 12 and list(specs)[0] == "wte.weight"
    assert list(specs)[-1] == "lm_head.weight"
    decayed = [s for k, s in specs.items() if k != "lm_head.weight" and len(s.shape) >= 2]
    assert sum(int(np.prod(s.shape)) for s in decayed) == 151_843_584 and len(decayed) == 49
    assert count_params(CHECK) == 4816
    for bad in (dict(n_embd=30, n_head=4), dict(n_embd=12, n_head=4), dict(base_scale=0.0),
                dict(dropout=0.1), dict(n_layer=0)):
        with pytest.raises(ConfigError):
            nGPTConfig(**bad)


def test_seeded_check():
    """The original's init consumes torch's RNG as its constructor does; the numbers are what
    the original's nGPT.py gives for the same seed and config."""
    torch.manual_seed(0)
    model = nanomoe_torch.nGPT(CHECK)
    idx = torch.from_numpy(CHECK_IDX)
    with torch.no_grad():
        logits, out = model(idx, torch.roll(idx, -1, 1))
    assert float(logits.sum()) == pytest.approx(2.22985, abs=2e-5)
    assert float(out["loss"]) == pytest.approx(3.47011, abs=2e-5)
    with torch.no_grad():
        assert float(model(idx, torch.roll(idx, 1, 1))[1]["loss"]) == pytest.approx(3.46296, abs=2e-5)
    np.testing.assert_allclose(logits[0, -1, :3].numpy(),
                               [-0.0620406, -0.0315525, 0.0201475], atol=2e-7)
    assert model.lm_head.weight is model.wte.weight


def sine_arrays(config):
    """An RNG-free check: the k-th entry of named_parameters() filled with sin(0.5 n + k)."""
    lm_head, _ = tied_names(config)
    names = [k for k in param_specs(config) if k != lm_head]
    arrays = {}
    for k, name in enumerate(names):
        shape = param_specs(config)[name].shape
        n = np.arange(int(np.prod(shape)), dtype=np.float32)
        arrays[name] = np.sin(np.float32(0.5) * n + np.float32(k)).reshape(shape)
    arrays[lm_head] = arrays["wte.weight"]
    return arrays


# loss, logits[0, -1, :3] (the original's numbers); the flags switch to the paper's RoPE and scale
SINE = {(): (4.95242, [2.26558, -1.66616, -1.78073]),
        (("standard_rope", True),): (4.95431, None),
        (("paper_attn_scale", True),): (4.95316, None)}


@pytest.mark.parametrize("flags", list(SINE), ids=["original", "standard_rope", "paper_scale"])
def test_rng_free_check_in_both_frameworks(flags):
    config = dataclasses.replace(CHECK, **dict(flags))
    loss, first3 = SINE[flags]
    arrays = sine_arrays(config)
    tm = nanomoe_torch.nGPT(config)
    nanomoe_torch.load_arrays(tm, arrays)
    jm = conversion.load_torch_weights(
        nanomoe_jax.nGPT(config, rngs=nnx.Rngs(0), dtype=jnp.float32), arrays)
    idx = torch.from_numpy(CHECK_IDX)
    with torch.no_grad():
        t_logits, t_out = tm(idx, torch.roll(idx, -1, 1))
    j_logits, j_out = jax_call(jm, jnp.asarray(CHECK_IDX), jnp.roll(jnp.asarray(CHECK_IDX), -1, 1))
    for logits, out in ((t_logits.detach().numpy(), t_out), (np.asarray(j_logits), j_out)):
        assert float(out["loss"]) == pytest.approx(loss, abs=2e-5)
        if first3:
            np.testing.assert_allclose(logits[0, -1, :3], first3, atol=2e-5)
            assert float(logits.sum()) == pytest.approx(-0.155221, abs=1e-4)


def test_seed_init_values():
    """The scale vectors start at base_scale, the matrices at std base_scale (bit-equality of
    the two frameworks' seeded init: test_jax_models.py)."""
    ref = init_params(TINY, 5)
    assert np.all(ref["blocks.0.sqk"] == np.float32(TINY.base_scale))
    assert np.std(ref["blocks.1.c_mlp.weight"]) == pytest.approx(TINY.base_scale, rel=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_keys_load_strictly(name):
    """The compiled original's keys (_orig_mod., both tied keys) load in both frameworks."""
    config = CONFIGS[name]
    tm = random_torch_model(config, seed=9)
    assert "sinusoidal_cache" not in tm.state_dict()  # non-persistent, as the original's
    # a state_dict as the original's compiled model saves it: _orig_mod. and both tied keys
    original = {f"_orig_mod.{k}": v.clone() for k, v in tm.state_dict().items()}
    assert {"_orig_mod.wte.weight", "_orig_mod.lm_head.weight"} <= set(original)
    fresh = nanomoe_torch.nGPT(config)
    fresh.load_original_state_dict(original)  # strict=True
    assert fresh.lm_head.weight is fresh.wte.weight
    jm = conversion.load_torch_weights(jax_twin(random_torch_model(config, seed=99)), original)
    for k, v in conversion.torch_state_dict(jm).items():
        assert torch.equal(v, tm.state_dict()[k]), k


def test_pt_import_and_safetensors_export(tmp_path, capsys):
    config = CONFIGS["ngpt-paper-std-rope"]
    tm = random_torch_model(config, seed=6)
    sd = {f"_orig_mod.{k}": v for k, v in tm.state_dict().items()}
    # the original's config (no model_type, no fields of ours): read as data
    orig_cfg = {k: v for k, v in dataclasses.asdict(TINY).items()
                if k not in ("paper_attn_scale", "standard_rope")}
    torch.save({"model": sd, "config": orig_cfg, "step": 7}, tmp_path / "orig.pt")
    conversion.from_torch(str(tmp_path / "orig.pt"), str(tmp_path / "jax"))
    assert "model ngpt" in capsys.readouterr().out
    # nanomoe's own folder (to-hf writes transformers remote code: tests/test_hf_remote.py)
    out = conversion.to_torch(str(tmp_path / "jax"), str(tmp_path / "st"), format="safetensors")
    back = nanomoe_torch.nGPT.from_pretrained(out)
    assert back.config == TINY  # the original's quirks, as the file came without our fields
    for k, v in tm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    torch.save(sd, tmp_path / "bare.pt")  # no config: the keys say nGPT
    conversion.from_torch(str(tmp_path / "bare.pt"), str(tmp_path / "bare"),
                          overrides={"n_head": 4, "block_size": 32})
    assert "inferred" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_with_cache_equals_full_forward_and_sampling(name):
    config = CONFIGS[name]
    tm = random_torch_model(config, seed=13)
    model = jax_twin(tm, dtype=jnp.float32)
    idx = jnp.asarray(np.random.default_rng(13).integers(0, config.vocab_size, (2, 12)))
    full = np.asarray(nnx.jit(lambda m, i: m(i)[0])(model, idx))

    @nnx.jit
    def decode_all(model, idx):
        cache = model.init_cache(2, 16)
        prefill, cache = model.decode(idx[:, :5], cache, jnp.int32(0))
        steps = [prefill]
        for t in range(5, 12):
            logits, cache = model.decode(idx[:, t:t + 1], cache, jnp.int32(t))
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    np.testing.assert_allclose(np.asarray(decode_all(model, idx)), full, rtol=1e-5, atol=1e-5)
    prompt = [3, 1, 4, 1, 5]
    assert generate(model, prompt, 8, temperature=0.0) == torch_generate(tm, prompt, 8, temperature=0.0)


def test_scale_floor_and_norm_eps_in_both_frameworks():
    """eff's floor (max|p| under 1e-6: p * c * 1e6) and justnorm's eps added to the norm, on
    vectors small enough for them to matter (random test weights never are)."""
    p = np.array([3e-7, -5e-7, 1e-7], np.float32)
    want = p * np.float32(0.05 / 1e-6)
    np.testing.assert_allclose(np.asarray(jax_ngpt.eff(jnp.asarray(p), 0.05)), want, rtol=1e-6)
    np.testing.assert_allclose(torch_ngpt.eff(torch.from_numpy(p), 0.05).numpy(), want, rtol=1e-6)
    x = np.array([[3e-8, 4e-8]], np.float32)  # norm 5e-8: the eps is a sixth of the divisor
    want = x / np.float32(5e-8 + 1e-8)
    np.testing.assert_allclose(np.asarray(jax_ngpt.justnorm(jnp.asarray(x))), want, rtol=1e-6)
    np.testing.assert_allclose(torch_ngpt.justnorm(torch.from_numpy(x)).numpy(), want, rtol=1e-6)


def test_normalize_weights_same_numbers_in_both_frameworks():
    tm = random_torch_model(TINY, seed=21)
    jm = jax_twin(tm, dtype=jnp.float32)
    torch_ngpt.normalize_weights(tm)
    params = jax_ngpt.normalize_weights(nnx.state(jm, nnx.Param))
    nnx.update(jm, params)
    exported = conversion.export_arrays(jm)
    normalised = 0
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(exported[k], v.numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
        axis = torch_ngpt.ngpt_norm_axis(k)
        if axis is not None:
            normalised += 1
            np.testing.assert_allclose(np.linalg.norm(v.numpy(), axis=axis), 1.0, atol=1e-6)
    assert normalised == 2 + 4 * TINY.n_layer  # wte, lm_head (the same tensor), 4 per block


def test_cli_defaults_and_refusals():
    assert parse_args(["--model_type", "ngpt"]).max_lr == 1.5e-3
    assert parse_args(["--model", "ngpt", "--max_lr", "1e-4"]).max_lr == 1e-4
    assert parse_args(["--model", "ngpt", "--no_override_defaults"]).max_lr == 6e-4
    with pytest.raises(ConfigError, match="ngpt"):
        build_config(parse_args(["--model", "gpt", "--ngpt_normalize_weights"]), None)


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 40 + "".join(chr(32 + (i * 7) % 90) for i in range(3000))


def train_flags(text_file, log_dir, *extra, steps=10):
    return ["--model", "ngpt", "--n_layer", "2", "--n_embd", "32", "--n_head", "4",
            "--block_size", "32", "--data", text_file, "--log_dir", str(log_dir), "--B", "2",
            "--T", "16", "--total_batch_size", "64", "--max_steps", str(steps),
            "--warmup_steps", "3", "--dtype", "float32", "--eval_interval", "1000",
            "--eval_steps", "2", "--sample_tokens", "4", *extra]


text_file = corpus_fixture(TEXT)


def test_jax_and_torch_train_the_same(text_file, tmp_path):
    """10 fp32 steps, grad accumulation 2, lr 1.5e-3: the same losses in both frameworks, and
    model_final.pt in the original's format from both."""
    jax_run = run(train_flags(text_file, tmp_path / "jax"), JaxBackend())
    torch_run = run(train_flags(text_file, tmp_path / "torch"), TorchBackend())
    assert len(jax_run["losses"]) == len(torch_run["losses"]) == 10
    for step, loss in torch_run["losses"].items():
        assert jax_run["losses"][step] == pytest.approx(loss, rel=1e-4), step
    assert jax_run["losses"][9] < jax_run["losses"][0]
    for fw in ("jax", "torch"):
        ckpt = torch.load(tmp_path / fw / "model_final.pt", weights_only=True)
        assert ckpt["config"]["model_type"] == "ngpt" and ckpt["step"] == 10
        assert list(ckpt["model"])[0] == "wte.weight" and list(ckpt["model"])[-1] == "lm_head.weight"
        nanomoe_torch.nGPT(TINY.__class__(**{k: v for k, v in ckpt["config"].items()
                                             if k != "model_type"})).load_state_dict(ckpt["model"], strict=True)


def test_weight_normalisation_flag_in_both_frameworks(text_file, tmp_path):
    """--ngpt_normalize_weights: after every step each weight vector along the embedding axis
    has unit norm (1e-6) in both frameworks, and the runs agree.

    Later steps are compared loosely: eff() divides by max|p|, and Adam's first steps move
    every entry of a scale vector by about +-lr, leaving entries tied to the last bits; which
    one is the max (and so takes the gradient through it) is then decided by rounding, which
    differs between the frameworks. That is the original's model, not this flag."""
    runs = {fw: run(train_flags(text_file, tmp_path / fw, "--ngpt_normalize_weights", steps=3),
                    backend()) for fw, backend in (("jax", JaxBackend), ("torch", TorchBackend))}
    for step in (0, 1):
        assert runs["jax"]["losses"][step] == pytest.approx(runs["torch"]["losses"][step], rel=1e-5)
    finals = {}
    for fw in runs:
        finals[fw] = torch.load(tmp_path / fw / "model_final.pt", weights_only=True)["model"]
        for k, v in finals[fw].items():
            axis = torch_ngpt.ngpt_norm_axis(k)
            if axis is not None:
                np.testing.assert_allclose(v.norm(dim=axis).numpy(), 1.0, atol=1e-6, err_msg=k)
    # without the flag the rows are far from unit norm (the original's loop)
    plain = run(train_flags(text_file, tmp_path / "plain", "--warmup_steps", "1", steps=1),
                TorchBackend())
    w = torch.load(tmp_path / "plain" / "model_final.pt", weights_only=True)["model"]["wte.weight"]
    assert plain["losses"][0] == pytest.approx(runs["torch"]["losses"][0], rel=1e-6)
    assert float((w.norm(dim=1) - 1).abs().max()) > 0.5
