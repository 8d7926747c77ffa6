"""MoeGPT and nGPT in stock transformers through remote code: the export, loading, logits and generate()
against the JAX model and sampler, left padding, sampling, save_pretrained, compare's code
check, the drift check against nanomoe_torch, tokenizer files, and a project-free process."""

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="nanomoe-hf-modules-"))

from helpers import MOE_CONFIGS, jax_twin, rel_err

import conversion
import nanomoe_torch
from nanomoe.pt_source import Source
from conversion.remote_code import PROJECT, REMOTE_MODELS, copied_block, generate_files
from conversion.remote_export import write_remote_folder
from nanomoe import ConversionError, MoeGPTConfig, nGPTConfig
from nanomoe.config import model_type_of
from nanomoe_jax.checkpoint import save_model
from nanomoe_jax.sample import generate as jax_generate

# default and sigmoid routing with fine-grained (m=2) experts; block 64 holds 8 + 50 tokens
GEN = {k: dataclasses.replace(MOE_CONFIGS[k], block_size=64, moe_dispatch="dense")
       for k in ("default", "sigmoid-m2")}
# nGPT: the original's quirks, and the paper's attention scale with the interleaved RoPE
NGPT = nGPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=64, vocab_size=96)
NGPT_CONFIGS = {"ngpt": NGPT, "ngpt-paper-std-rope": dataclasses.replace(
    NGPT, paper_attn_scale=True, standard_rope=True)}
GEN.update(NGPT_CONFIGS)
PROMPT = [5, 17, 3, 44, 2, 9, 61, 30]


def random_model(config, seed=0, scale=0.5):
    """Weights far enough from the init that greedy text varies (at 0.05 it repeats a token)."""
    torch.manual_seed(seed)
    model = nanomoe_torch.create_model(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def export(model, folder, meta=None):
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_remote_folder(str(folder), Source(model.config, arrays, 7, meta or {}), log=None)
    return str(folder)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                local_files_only=True).eval()


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


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_drift_generated_model_equals_nanomoe_torch(name, tmp_path):
    """The exported code against the reference on random weights, every MoE config, and the
    reference's own source inside the exported file: a change on either side fails here."""
    tm = random_model(dataclasses.replace(MOE_CONFIGS[name], moe_dispatch="dense"), seed=3)
    hf = load(export(tm, tmp_path / "hf"))
    idx = torch.from_numpy(np.random.default_rng(2).integers(0, 96, (2, 32)))
    with torch.no_grad():
        assert rel_err(hf(idx).logits.numpy(), tm(idx)[0].numpy()) <= 1e-6
    text = generate_files("moegpt")["modeling_moegpt.py"]
    from nanomoe import rope
    from nanomoe_torch import layers, moe

    for obj in (rope.rope_table, layers.RMSNorm, layers.apply_rope, moe.Routing, moe.route,
                moe.ParallelMoE, moe.MoE):
        assert inspect.getsource(obj) in text, obj.__name__


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


@pytest.mark.parametrize("name", list(NGPT_CONFIGS))
def test_drift_generated_ngpt_equals_nanomoe_torch(name, tmp_path):
    """nGPT's exported code against the reference on random weights, the scale vectors
    (alphas, sqk, suv) random too, and the reference's own source inside the exported file."""
    tm = random_model(NGPT_CONFIGS[name], seed=3)
    assert all(len(set(tm.blocks[0].state_dict()[k].tolist())) > 1
               for k in ("attn_alpha", "mlp_alpha", "sqk", "suv"))  # not the init's constants
    hf = load(export(tm, tmp_path / "hf"))
    idx = torch.from_numpy(np.random.default_rng(2).integers(0, 96, (2, 32)))
    with torch.no_grad():
        assert rel_err(hf(idx).logits.numpy(), tm(idx)[0].numpy()) <= 1e-6
    text = generate_files("ngpt")["modeling_ngpt.py"]
    from nanomoe import rope
    from nanomoe_torch import layers, ngpt

    for obj in (rope.rope_table, layers.RMSNorm, layers.apply_rope, ngpt.justnorm, ngpt.eff,
                ngpt.half_split_rotary):
        assert inspect.getsource(obj) in text, obj.__name__
    for line in ("ROPE_BASE = ", "ALPHA_TARGET = ", "SCALE_FLOOR = "):
        assert next(x for x in inspect.getsource(ngpt).splitlines() if x.startswith(line)) in text


def test_generator_refuses_an_uncopied_project_name():
    with pytest.raises(ConversionError, match="uses rope_table from this project"):
        copied_block([("nanomoe_torch.layers", ["Attention"])])


@pytest.mark.parametrize("name", ["default", "ngpt"])
def test_to_hf_and_compare_check_the_code(name, tmp_path, capsys):
    tm = random_model(GEN[name], seed=5)
    ckpt = str(tmp_path / "ckpt")
    save_model(jax_twin(tm, dtype=jnp.float32), ckpt, 3)
    folder = conversion.to_hf(ckpt, str(tmp_path / "hf"))
    assert "trust_remote_code=True" in capsys.readouterr().out
    r = conversion.compare(ckpt, folder, tokens=PROMPT, tolerance=1e-5)
    assert r["ok"] and r["greedy"] and r["rel"] <= 1e-5
    assert "greedy decoding of 50 tokens: identical" in capsys.readouterr().out
    marker = tmp_path / "ran"
    with open(os.path.join(folder, f"modeling_{model_type_of(tm.config)}.py"), "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ConversionError, match="differs from the code this version"):
        conversion.compare(ckpt, folder, tokens=PROMPT)
    assert not marker.exists()  # refused before anything of the folder ran


def test_tokenizer_files(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from nanomoe.tokenizer import get_tokenizer

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "hello", "world", "moe", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    tm = random_model(GEN["default"])
    folder = export(tm, tmp_path / "json", {"tokenizer": str(tmp_path / "tokenizer.json")})
    theirs = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ours = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert theirs("hello moe world")["input_ids"] == ours.encode("hello moe world") == [1, 3, 2]
    assert theirs.eos_token == "<|endoftext|>"
    # GPT-2: copied from tiktoken's cache (its files are GPT-2's vocab.json / merges.txt) only
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    assert "not cached" in write_remote_folder(
        str(tmp_path / "g0"), Source(tm.config, {k: v.numpy() for k, v in
                                                 tm.state_dict().items()}, 0,
                                     {"tokenizer": "gpt2"}), None)
    assert not {"vocab.json", "merges.txt"} & set(os.listdir(tmp_path / "g0"))


ISOLATED = r"""
import json, sys
sys.path.append(sys.argv[2])  # site-packages only: no .pth files, so no editable project
for name in ("nanomoe", "nanomoe_torch", "nanomoe_jax", "conversion", "helpers"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable")
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True,
                                         local_files_only=True).eval()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    logits = m(ids).logits[0].tolist()
out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
loaded = sorted({k.split(".")[0] for k in sys.modules} & {"jax", "flax", "tiktoken", "nanomoe"})
print(json.dumps({"logits": logits, "tokens": out[0, ids.size(1):].tolist(), "loaded": loaded}))
"""


@pytest.mark.parametrize("name", ["sigmoid-m2", "ngpt"])
def test_loads_without_this_project(name, tmp_path):
    """Only torch, transformers, safetensors and their dependencies: ``python -I -S`` (no
    site, no PYTHONPATH, no current folder) with site-packages appended by hand."""
    import transformers

    tm = random_model(GEN[name])
    jm, folder = jax_twin(tm, dtype=jnp.float32), export(tm, tmp_path / "hf")
    site = os.path.dirname(os.path.dirname(transformers.__file__))
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", ISOLATED, folder, site,
                        json.dumps(PROMPT)], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert rel_err(got["logits"], np.asarray(jm(jnp.asarray([PROMPT]))[0][0])) <= 1e-5
    assert got["tokens"] == jax_generate(jm, PROMPT, 20, temperature=0)
