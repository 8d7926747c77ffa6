"""nanoGPT's recipe is reachable and a first run reads well (issue 15): AdamW betas and weight
decay as flags in both frameworks, recipe runs that agree across frameworks and resume exactly,
--eval_steps all reporting its tokens, and the end-of-run text with the run's real paths. The
loaders themselves (random windows, all windows) are tested in test_window_loaders.py."""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nanomoe import next_steps, run_dir
from nanomoe.cli import parse_args
from nanomoe.train_loop import main, run
from nanomoe_jax.layers import param
from nanomoe_jax.train import make_optimizer as jax_optimizer
from nanomoe_torch.train import make_optimizer as torch_optimizer
from nanomoe_train.jax_backend import JaxBackend
from nanomoe_train.torch_backend import TorchBackend

from helpers import corpus_fixture
from nanomoe import GPTConfig

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 30 + "".join(chr(32 + (i * 7) % 90)
                                                             for i in range(2000))
RECIPE = ["--beta1", "0.8", "--beta2", "0.99", "--weight_decay", "0.3", "--data_order", "random",
          "--eval_steps", "all"]


text_file = corpus_fixture(TEXT)


def tiny(framework, text_file, log_dir, *extra, steps=6):
    return ["--framework", framework, "--model", "gpt", "--n_layer", "1", "--n_embd", "32",
            "--n_head", "2", "--block_size", "32", "--data", text_file, "--log_dir", str(log_dir),
            "--B", "2", "--T", "16", "--total_batch_size", "64", "--max_steps", str(steps),
            "--warmup_steps", "2", "--dtype", "float32", "--eval_interval", "3",
            "--ckpt_interval", "3", "--sample_tokens", "2", "--max_lr", "3e-3", *extra]


def backend(framework):
    return JaxBackend() if framework == "jax" else TorchBackend()


def quiet_run(argv, framework):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run(argv, backend(framework))
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def straight(text_file, tmp_path_factory):
    """The recipe run for 6 steps in each framework: {framework: (summary, stdout, log)}."""
    runs = {}
    for framework in ("jax", "torch"):
        log = tmp_path_factory.mktemp("runs") / f"straight-{framework}"
        runs[framework] = (*quiet_run(tiny(framework, text_file, log, *RECIPE), framework), log)
    return runs


@pytest.fixture(scope="module")
def stopped(text_file, tmp_path_factory):
    """The JAX recipe run stopped after 3 of its 6 steps."""
    log = tmp_path_factory.mktemp("runs") / "stopped"
    quiet_run(tiny("jax", text_file, log, *RECIPE, "--stop_at", "3"), "jax")
    return log


def one_sentence(err: str, *words: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


# ---------------------------------------------------------------------------------- AdamW


def adamw_numpy(p, grads, lr, b1, b2, wd, eps=1e-8):
    """torch.optim.AdamW written out: decoupled decay, bias-corrected moments."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_betas_and_weight_decay_reach_both_optimizers():
    """Three steps with changing gradients (so beta1/beta2 matter) against AdamW by hand;
    only the matrix is decayed. Both optimizers are built from the flags' values."""
    args = parse_args(RECIPE)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * 0.05 for _ in range(3)]  # norm < 1
    lr = 1e-2
    want = adamw_numpy(w.astype(np.float64), grads, lr, 0.8, 0.99, 0.3)

    # a parameter as the models make it: its logical axes say it is a matrix (decayed)
    as_param = lambda a: {"w": param(jnp.asarray(a), ("embed", "mlp"))}  # noqa: E731
    params = as_param(w)
    tx = jax_optimizer(GPTConfig(), params, args.weight_decay, args.beta1, args.beta2)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(as_param(g), state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)  # as the JAX step
    np.testing.assert_allclose(params["w"][...], want, rtol=1e-5, atol=1e-6)

    model = torch.nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
    opt = torch_optimizer(model, GPTConfig(), 1.0, fused=False, betas=(args.beta1, args.beta2),
                          weight_decay=args.weight_decay)
    for g in grads:
        model.weight.grad = torch.from_numpy(g)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_jax_and_torch_train_the_same_with_the_recipe(straight):
    """Non-default betas and decay, random windows, whole-split eval: the per-step and val
    losses agree across frameworks (fp32, 1e-4), so both read the flags and the same data."""
    jax_run, torch_run = straight["jax"][0], straight["torch"][0]
    assert sorted(jax_run["losses"]) == sorted(torch_run["losses"]) == list(range(6))
    for step, loss in torch_run["losses"].items():
        assert jax_run["losses"][step] == pytest.approx(loss, rel=1e-4), step
    evals = [[r for r in out["records"] if "val_loss" in r] for out in (jax_run, torch_run)]
    for a, b in zip(*evals, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["val_tokens"] == b["val_tokens"]


# ---------------------------------------------------------------------------- eval all


def test_eval_all_reports_the_tokens_scored(straight):
    summary, stdout, _ = straight["jax"]
    evals = [r for r in summary["records"] if "val_loss" in r]
    val_len = len(TEXT) - int(len(TEXT) * 0.9)  # bytes; the last 10% of the text is val
    assert [r["val_tokens"] for r in evals] == [(val_len - 1) // 32 * 32] * 3
    assert f"({evals[0]['val_tokens']:,} tokens)" in stdout


# --------------------------------------------------------------------- resume and flags


def test_resume_with_random_order_continues_exactly(stopped, straight, text_file):
    resumed, _ = quiet_run(tiny("jax", text_file, stopped, *RECIPE, "--resume"), "jax")
    assert sorted(resumed["losses"]) == [3, 4, 5]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight["jax"][0]["losses"][step], rel=1e-6), step


def test_resume_refuses_a_changed_recipe(stopped, text_file, capsys):
    for extra, name in ((["--beta2", "0.95"], "--beta2: 0.99 -> 0.95"),
                        (["--data_order", "sequential"], "--data_order: 'random' -> 'sequential'"),
                        (["--weight_decay", "0.1"], "--weight_decay")):
        argv = tiny("jax", text_file, stopped, *RECIPE, "--resume", *extra)
        assert main(argv, JaxBackend) == 2
        one_sentence(capsys.readouterr().err, name)


def test_an_older_run_json_resumes_with_the_defaults(tmp_path):
    """run.json written before the recipe flags existed: missing keys are their defaults."""
    def check(*extra):
        args = parse_args(["--log_dir", str(tmp_path), "--resume", *extra])
        info = {"model_type": "moegpt", "framework": "jax", "tokenizer": "byte", "config": {},
                "flags": run_dir.compute_flags(args)}
        run_dir.check(args, info)

    flags = run_dir.compute_flags(parse_args([]))
    old = {k: v for k, v in flags.items() if k not in run_dir.LATER_FLAGS}
    (tmp_path / "run.json").write_text(json.dumps(
        {"model_type": "moegpt", "framework": "jax", "tokenizer": "byte", "config": {},
         "flags": old}))
    check()  # accepted
    with pytest.raises(run_dir.RunDirError, match="--beta2: 0.95 -> 0.99"):
        check("--beta2", "0.99")
    with pytest.raises(run_dir.RunDirError, match="--data_order"):
        check("--data_order", "random")


@pytest.mark.parametrize("extra,words", [
    (["--beta2", "1.5"], ["--beta2 must be in [0, 1), got 1.5"]),
    (["--beta1", "-0.1"], ["--beta1"]), (["--beta2", "nan"], ["--beta2"]),
    (["--weight_decay", "-1"], ["--weight_decay must be a finite number >= 0"]),
    (["--weight_decay", "inf"], ["--weight_decay"]),
    (["--data_order", "foo"], ["--data_order must be sequential or random, got 'foo'"]),
    (["--eval_steps", "-3"], ["--eval_steps must be at least 1, got -3", "all"]),
    (["--eval_steps", "most"], ["--eval_steps", "'most'"]),
])
def test_bad_recipe_values_get_one_sentence_and_write_nothing(extra, words, text_file, tmp_path,
                                                               capsys):
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, *extra), JaxBackend) == 2
    one_sentence(capsys.readouterr().err, *words)
    assert not log.exists()


# ------------------------------------------------------------------------ the last words


def test_the_end_of_a_run_names_its_real_paths(straight):
    _, stdout, log = straight["jax"]
    end = stdout[stdout.index("Done: 6 steps."):]
    for text in (f"Files in {log}/", "checkpoints/6 ", "model_final.pt", "metrics.jsonl",
                 "loss.png", f"python -m nanomoe_jax.sample --checkpoint {log} --prompt "
                 f"\"Hello, I'm a language model,\"",
                 f"python -m conversion to-hf {log}/checkpoints --out {log}/hf",
                 f"python -m conversion to-torch {log}/checkpoints --format safetensors --out "
                 f"{log}/safetensors",
                 "JAX_PLATFORMS=cpu .venv-plan/bin/python -m benchmarks.plan --target rtx4090 "
                 "--model gpt"):
        assert text in end, text
    assert os.path.isdir(os.path.join(log, "checkpoints", "6"))
    _, stdout, log = straight["torch"]
    end = stdout[stdout.index("Done: 6 steps."):]
    for text in ("model_000006.pt ", f"python -m nanomoe_torch.sample --checkpoint "
                 f"{log}/model_final.pt", f"to-hf {log}/model_final.pt --out {log}/hf"):
        assert text in end, text
    assert os.path.isfile(os.path.join(log, "model_000006.pt"))


def test_the_plan_is_offered_only_for_models_it_knows():
    from benchmarks.plan import MODELS

    assert set(next_steps.PLAN_MODELS) <= set(MODELS)
    args = parse_args(["--model", "ngpt", "--log_dir", "x"])
    assert "benchmarks.plan" not in next_steps.text(args, "jax", "byte")
    args = parse_args(["--model", "moegpt", "--log_dir", "x y", "--tokenizer", "t.json"])
    text = next_steps.text(args, "torch", "t.json")
    assert "--checkpoint 'x y/model_final.pt'" in text and "--tokenizer t.json" in text
