"""The exported remote code cannot drift or be tampered with: the generated MoeGPT and nGPT
modeling files equal nanomoe_torch on random weights and hold its source, the generator refuses
an uncopied project name, to-hf and compare check the code, tokenizer files are exported, and
the folder loads in a process that cannot import this project."""

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
from helpers import HF_GEN as GEN, HF_NGPT_CONFIGS as NGPT_CONFIGS, HF_PROMPT as PROMPT
from helpers import export_remote as export, load_remote as load, random_model

import conversion
from nanomoe.pt_source import Source
from conversion.remote_code import copied_block, generate_files
from conversion.remote_export import write_remote_folder
from nanomoe import ConversionError
from nanomoe.config import model_type_of
from nanomoe_jax.checkpoint import save_model
from nanomoe_jax.sample import generate as jax_generate


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_drift_generated_model_equals_nanomoe_torch(name, tmp_path):
    """The exported code against the reference on random weights, every MoE config, and the
    reference's own source inside the exported file: a change on either side fails here."""
    tm = random_model(dataclasses.replace(MOE_CONFIGS[name], moe_dispatch="dense"), seed=3)
    from nanomoe_torch import moe

    assert_same_as_reference(tm, tmp_path, "moegpt",
                             (moe.Routing, moe.route, moe.ParallelMoE, moe.MoE))


@pytest.mark.parametrize("name", list(NGPT_CONFIGS))
def test_drift_generated_ngpt_equals_nanomoe_torch(name, tmp_path):
    """nGPT's exported code against the reference on random weights, the scale vectors
    (alphas, sqk, suv) random too, and the reference's own source inside the exported file."""
    tm = random_model(NGPT_CONFIGS[name], seed=3)
    assert all(len(set(tm.blocks[0].state_dict()[k].tolist())) > 1
               for k in ("attn_alpha", "mlp_alpha", "sqk", "suv"))  # not the init's constants
    from nanomoe_torch import ngpt

    assert_same_as_reference(tm, tmp_path, "ngpt",
                             (ngpt.justnorm, ngpt.eff, ngpt.half_split_rotary))
    text = generate_files("ngpt")["modeling_ngpt.py"]
    for line in ("ROPE_BASE = ", "ALPHA_TARGET = ", "SCALE_FLOOR = "):
        assert next(x for x in inspect.getsource(ngpt).splitlines() if x.startswith(line)) in text


def assert_same_as_reference(tm, tmp_path, kind: str, own_sources) -> None:
    """The exported ``kind`` model gives the reference's logits (1e-6), and its code holds
    the reference's own source of the shared pieces and of ``own_sources``."""
    hf = load(export(tm, tmp_path / "hf"))
    idx = torch.from_numpy(np.random.default_rng(2).integers(0, 96, (2, 32)))
    with torch.no_grad():
        assert rel_err(hf(idx).logits.numpy(), tm(idx)[0].numpy()) <= 1e-6
    text = generate_files(kind)[f"modeling_{kind}.py"]
    from nanomoe import rope
    from nanomoe_torch import layers

    for obj in (rope.rope_table, layers.RMSNorm, layers.apply_rope, *own_sources):
        assert inspect.getsource(obj) in text, obj.__name__


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
