"""MoeGPT and nGPT in stock transformers through remote code, model by model: the exported
folder loads, its logits and generate() match the JAX model and sampler, left padding and
sampling behave, save_pretrained round-trips, and the config template matches our config.
Drift, code checks, tokenizer files and a project-free process: test_hf_remote_drift.py."""

import ast
import dataclasses
import inspect
import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="nanomoe-hf-modules-"))

from helpers import MOE_CONFIGS, jax_twin, rel_err
from helpers import HF_GEN as GEN, HF_NGPT as NGPT, HF_PROMPT as PROMPT
from helpers import export_remote as export, load_remote as load, random_model

from conversion.remote_code import PROJECT, REMOTE_MODELS, generate_files
from nanomoe import MoeGPTConfig, nGPTConfig
from nanomoe.config import model_type_of
from nanomoe_jax.sample import generate as jax_generate


@pytest.fixture(scope="module", params=list(GEN))
def case(request, tmp_path_factory):
    tm = random_model(GEN[request.param])
    folder = export(tm, tmp_path_factory.mktemp(request.param) / "hf")
    return tm, jax_twin(tm, dtype=jnp.float32), folder, load(folder)


def greedy(hf, ids, n, **kw):
    ids = torch.tensor([ids])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, **kw)
    return out[0, ids.size(1):].tolist()


def test_folder_loads_with_remote_code(case):
    from transformers import AutoConfig

    tm, _, folder, hf = case
    kind = model_type_of(tm.config)
    spec = REMOTE_MODELS[kind]
    names = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "model.safetensors",
            f"configuration_{kind}.py", f"modeling_{kind}.py"} <= names
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    big = {"moegpt": "MoeGPT", "ngpt": "NGPT"}[kind]
    assert cfg["model_type"] == f"nanomoe_{kind}"
    assert cfg["architectures"] == [f"Nano{big}ForCausalLM"]
    assert cfg["auto_map"] == spec.auto_map == {
        "AutoConfig": f"configuration_{kind}.Nano{big}Config",
        "AutoModelForCausalLM": f"modeling_{kind}.Nano{big}ForCausalLM"}
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True,
                                           local_files_only=True)).__name__ == f"Nano{big}Config"
    assert type(hf).__name__ == f"Nano{big}ForCausalLM"
    assert hf.lm_head.weight is hf.wte.weight  # the tie, from the embedding stored once
    for k, v in tm.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k
    for name, text in generate_files(kind).items():  # what the generator writes now
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            assert f.read() == text
        imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                    for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names if not getattr(n, "level", 0)}
        assert not imported & set(PROJECT), name
        assert imported <= {"__future__", "math", "functools", "typing", "numpy", "torch",
                            "transformers"}, imported


def test_logits_match_jax_and_torch_reference(case):
    tm, jm, _, hf = case
    idx = np.random.default_rng(1).integers(0, tm.config.vocab_size, (2, 24))
    with torch.no_grad():
        got = hf(torch.from_numpy(idx)).logits.numpy()
        ref = tm(torch.from_numpy(idx))[0].numpy()
    assert rel_err(got, np.asarray(jm(jnp.asarray(idx))[0])) <= 1e-5
    assert rel_err(got, ref) <= 1e-6


def test_greedy_generate_equals_jax_sampler(case):
    _, jm, _, hf = case
    want = jax_generate(jm, PROMPT, 50, temperature=0)
    # a varied text, not one repeated token; random nGPTs repeat one (each layer moves the
    # unit residual at most 5% off its embedding), so there every step's cached logits are
    # compared with the JAX model's full forward instead
    ngpt = isinstance(jm.config, nGPTConfig)
    assert len(want) == 50 and (ngpt or len(set(want)) >= 5)
    assert greedy(hf, PROMPT, 50) == want  # the KV cache (DynamicCache)
    ids = torch.tensor([PROMPT])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=50,
                      do_sample=False, output_scores=True, return_dict_in_generate=True)
    steps = torch.stack(out.scores, 1)[0].numpy()  # (50, vocab): logits before each token
    full = np.asarray(jm(jnp.asarray([PROMPT + want]))[0][0, len(PROMPT) - 1:-1])
    assert rel_err(steps, full) <= 1e-5
    assert greedy(hf, PROMPT, 12, use_cache=False) == want[:12]  # every step from scratch


def test_left_padded_batch_equals_unpadded(case):
    _, _, _, hf = case
    short = [7, 1, 60]
    ids = torch.tensor([PROMPT, [0] * 5 + short])
    mask = torch.tensor([[1] * 8, [0] * 5 + [1] * 3])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, 8:]
    assert out[0].tolist() == greedy(hf, PROMPT, 20)
    assert out[1].tolist() == greedy(hf, short, 20)
    with torch.no_grad():  # and the logits of the real tokens themselves
        padded = hf(ids, attention_mask=mask).logits[1, 5:]
        alone = hf(torch.tensor([short])).logits[0]
    assert rel_err(padded.numpy(), alone.numpy()) <= 1e-5


def test_sampling_and_save_pretrained_round_trip(tmp_path):
    hf = load(export(random_model(GEN["default"]), tmp_path / "hf"))
    ids = torch.tensor([PROMPT])

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return hf.generate(ids, max_new_tokens=30, do_sample=True, **kw)[0, 8:].tolist()

    assert sample(0, top_k=1) == greedy(hf, PROMPT, 30)  # sampling from the top-1 is greedy
    a, b = sample(0, temperature=1.5), sample(0, temperature=1.5)
    assert a == b and a != greedy(hf, PROMPT, 30) and a != sample(1, temperature=1.5)
    hf.save_pretrained(str(tmp_path / "again"))
    back = load(str(tmp_path / "again"))
    assert back.lm_head.weight is back.wte.weight
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert greedy(back, PROMPT, 10) == greedy(hf, PROMPT, 10)


def test_config_template_matches_our_config(case):
    _, _, _, hf = case
    if "NGPT" in type(hf).__name__:
        return _check_ngpt_config_template(hf)
    ours = {f.name: f.default for f in dataclasses.fields(MoeGPTConfig)}
    ours["rope_base"] = ours.pop("rope_scaling")
    theirs = inspect.signature(type(hf.config).__init__).parameters
    shared = [k for k in theirs if k in ours]
    assert len(shared) == 16  # every MoeGPTConfig field but the JAX-only and training ones
    assert {k: theirs[k].default for k in shared} == {k: ours[k] for k in shared}
    for c in MOE_CONFIGS.values():
        hc = type(hf.config)(**{k: getattr(c, k if k != "rope_base" else "rope_scaling")
                                for k in shared})
        for prop in ("n_total_experts", "n_shared", "n_routed_experts", "expert_hidden"):
            assert getattr(hc, prop) == getattr(c, prop), prop


def _check_ngpt_config_template(hf):
    ours = {f.name: f.default for f in dataclasses.fields(nGPTConfig)}
    theirs = inspect.signature(type(hf.config).__init__).parameters
    shared = [k for k in theirs if k in ours]
    assert shared == list(ours)  # every nGPTConfig field
    assert {k: theirs[k].default for k in shared} == ours
    assert hf.config.base_scale == NGPT.base_scale
