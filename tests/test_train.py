"""Training: schedule, gradient accumulation, cross-framework parity, resume, end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
import nanomoe_torch
from nanomoe.schedule import lr_at
from nanomoe.train_loop import run
from nanomoe_train.jax_backend import JaxBackend
from nanomoe_train.torch_backend import TorchBackend

from helpers import corpus_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 40 + "".join(chr(32 + (i * 7) % 90) for i in range(3000))

TINY_FLAGS = {
    "gpt": ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--block_size", "32"],
    "moderngpt": ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2",
                  "--block_size", "32"],
    "moegpt": ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--block_size", "32",
               "--n_experts", "5", "--n_activated_experts", "2", "--capacity_factor", "4.0"],
}


text_file = corpus_fixture(TEXT)


def flags(model, text_file, log_dir, *extra, steps=10):
    return ["--model", model, *TINY_FLAGS[model], "--data", text_file, "--log_dir", str(log_dir),
            "--B", "2", "--T", "16", "--total_batch_size", "64", "--max_steps", str(steps),
            "--warmup_steps", "3", "--dtype", "float32", "--eval_interval", "1000",
            "--eval_steps", "2", "--sample_tokens", "4", *extra]


def test_schedule_matches_the_original():
    args = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)
    assert lr_at(0, **args) == pytest.approx(6e-5)          # warmup: max_lr * 1/10
    assert lr_at(9, **args) == pytest.approx(6e-4)          # peak at the end of warmup
    assert lr_at(10, **args) == pytest.approx(6e-4)         # cosine starts at max_lr
    assert lr_at(55, **args) == pytest.approx(3.3e-4)       # half way: the mean of max and min
    assert lr_at(100, **args) == pytest.approx(6e-5)        # cosine ends at min_lr
    assert lr_at(500, **args) == pytest.approx(6e-5)        # min_lr after max_steps


@pytest.mark.parametrize("model", ["gpt", "moderngpt", "moegpt"])
def test_jax_and_torch_train_the_same(model, text_file, tmp_path):
    """Same seed, data and fp32: 10 optimizer steps with grad accumulation 2 (B*T=32, 64 tokens
    per step) give the same per-step losses in both frameworks."""
    examples = [{"ctx": "a cat", "endings": ["sat.", "ran.", "is.", "to."], "label": 0},
                {"ctx": "The sun", "endings": [" rose", " sang", " ate", " wet"], "label": 0}]
    hs_file = tmp_path / "hellaswag.jsonl"  # endings short enough for block_size 32, in bytes
    hs_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
    hellaswag = ["--do_hellaswag", "--hellaswag_file", str(hs_file)]
    jax_run = run(flags(model, text_file, tmp_path / "jax", *hellaswag), JaxBackend())
    torch_run = run(flags(model, text_file, tmp_path / "torch", *hellaswag), TorchBackend())
    assert len(jax_run["losses"]) == len(torch_run["losses"]) == 10
    for step, loss in torch_run["losses"].items():
        assert jax_run["losses"][step] == pytest.approx(loss, rel=1e-4), step
    assert jax_run["losses"][9] < jax_run["losses"][0]
    # evaluation too: the same validation losses and HellaSwag choices
    evals = [[r for r in out["records"] if "val_loss" in r] for out in (jax_run, torch_run)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 10]
    for a, b in zip(*evals):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["hellaswag_acc"] == b["hellaswag_acc"]


@pytest.mark.parametrize("model", ["gpt", "moderngpt", "moegpt"])
def test_accumulated_step_equals_big_batch(model, text_file, tmp_path):
    """4 micro-batches accumulated = the 4x batch: loss and gradients (fp32, 1e-5). The MoE is
    compared on its cross-entropy part: the balance loss is a per-micro-batch statistic."""
    from nanomoe.cli import build_config, parse_args
    from nanomoe_jax.train import accumulate_gradients

    extra = ["--moe_loss_weight", "0"] if model == "moegpt" else []  # cross-entropy alone
    args = parse_args(flags(model, text_file, tmp_path, *extra))
    backend = JaxBackend()
    backend.setup(build_config(args, 256), args)
    params = backend.state[0]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (4, 2, 16)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 256, (4, 2, 16)), jnp.int32)
    accumulate = jax.jit(accumulate_gradients, static_argnums=0)
    g_a, m_a = accumulate(backend.graphdef, params, x, y)
    g_b, m_b = accumulate(backend.graphdef, params, x.reshape(1, 8, 16), y.reshape(1, 8, 16))
    key = "ce_loss" if model == "moegpt" else "loss"
    assert float(m_a[key]) == pytest.approx(float(m_b[key]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("backend", [JaxBackend, TorchBackend])
def test_resume_continues_exactly(backend, text_file, tmp_path):
    """6 steps straight = 3 steps, stop, --resume, 3 more: losses and final weights (1e-6)."""
    straight = run(flags("moegpt", text_file, tmp_path / "a", steps=6), backend())
    run(flags("moegpt", text_file, tmp_path / "b", "--stop_at", "3", steps=6), backend())
    resumed = run(flags("moegpt", text_file, tmp_path / "b", "--resume", steps=6), backend())
    assert sorted(resumed["losses"]) == [3, 4, 5]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight["losses"][step], rel=1e-6), step
    a = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_final.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-8)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")
             if "loss" in json.loads(line)]
    assert steps == list(range(6))  # each step once


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_train_py_end_to_end(framework, text_file, tmp_path):
    """train.py as a user runs it: the loss falls; metrics.jsonl, loss.png, a checkpoint and
    model_final.pt appear; model_final.pt loads into nanomoe_torch and gives the JAX logits."""
    log_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--framework", framework,
           *flags("moegpt", text_file, log_dir, "--eval_interval", "10", "--ckpt_interval", "20",
                  "--max_lr", "3e-3", steps=30)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample at step 30" in out.stdout
    records = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    train = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(train) == 30 and len(val) == 4
    assert np.mean(train[-5:]) < np.mean(train[:5]) - 0.5
    assert val[-1] < val[0]
    assert (log_dir / "loss.png").stat().st_size > 1000
    ckpt = torch.load(log_dir / "model_final.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"]["model_type"] == "moegpt"
    from nanomoe import config_from_dict

    config = config_from_dict(ckpt["config"])
    tm = nanomoe_torch.MoeGPT(config)
    tm.load_state_dict(ckpt["model"], strict=True)
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    sampler = [sys.executable, "-m", f"nanomoe_{framework}.sample", "--max_new_tokens", "5",
               "--checkpoint", str(log_dir if framework == "jax" else log_dir / "model_final.pt")]
    sampled = subprocess.run(sampler, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sampled.returncode == 0 and "--- sample 0" in sampled.stdout, sampled.stderr[-2000:]
    if framework == "jax":
        assert (log_dir / "checkpoints" / "30").is_dir()
        backend = JaxBackend()
        from nanomoe.cli import parse_args

        backend.setup(config, parse_args(flags("moegpt", text_file, log_dir)))
        backend.restore(str(log_dir), 30)
        jax_logits = nnx.jit(lambda m, i: m(i)[0])(backend.model, jnp.asarray(idx))
        torch_logits = tm(torch.from_numpy(idx))[0].detach().numpy()
        np.testing.assert_allclose(np.asarray(jax_logits), torch_logits, rtol=1e-4, atol=1e-5)
    else:
        assert (log_dir / "model_000030.pt").exists()


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_init_from_hugging_face_gpt2_folder(framework, text_file, tmp_path):
    """--init_from a local Hugging Face GPT-2 folder (as `gpt2` is when the hub is reachable):
    training starts from exactly those weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                    vocab_size=256, activation_function="gelu_new"))
    hf.save_pretrained(tmp_path / "hf")
    args = flags("gpt", text_file, tmp_path / "run", "--init_from", str(tmp_path / "hf"),
                 "--vocab_size", "256", "--max_lr", "0", "--min_lr", "0", steps=1)
    run(args, JaxBackend() if framework == "jax" else TorchBackend())
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)["model"]
    ref = hf.state_dict()
    torch.testing.assert_close(final["transformer.wte.weight"], ref["transformer.wte.weight"])
    torch.testing.assert_close(final["transformer.h.1.attn.c_attn.weight"],
                               ref["transformer.h.1.attn.c_attn.weight"].T)  # Conv1D is (in, out)


def test_wandb_logging_uses_the_run(text_file, tmp_path, monkeypatch):
    """--wandb: one wandb run gets every metrics line (a stand-in module: no account, no network)."""
    import types

    calls = {"log": [], "init": None, "finished": False}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(flags("gpt", text_file, tmp_path, "--wandb", "--run_name", "tiny", steps=3), JaxBackend())
    assert calls["init"]["name"] == "tiny" and calls["finished"]
    steps = [s for s, d in calls["log"] if "loss" in d]
    assert steps == [0, 1, 2] and any("val_loss" in d for _, d in calls["log"])
