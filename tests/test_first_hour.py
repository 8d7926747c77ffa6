"""What a newcomer sees in the first hour (issue 25): progress lines that do not extrapolate
the first step's compile time, the end-of-run hints and messages."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from nanomoe import metrics, step_log, train_loop

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Times like JAX on a CPU, on a fake clock: the first train_step and the first eval
    compile, steps run asynchronously (dispatch returns, fetch waits for the device)."""

    name, has_accelerator, async_dispatch = "jax", False, True
    device_name, process_index, process_count = "cpu", 0, 1

    def __init__(self, clock, compile_s=90.0, step_s=0.5, eval_s=3.0, eval_compile_s=8.0):
        self.clock, self.compile_s, self.step_s = clock, compile_s, step_s
        self.eval_s, self.eval_compile_s = eval_s, eval_compile_s
        self.device_free = 0.0  # when the fake device finishes what it was given
        self.steps = self.evals = 0

    def setup(self, config, args):
        self.vocab = config.vocab_size

    def train_step(self, x, y, lr):
        if self.steps == 0:
            self.clock.now += self.compile_s  # tracing and compiling block the caller
        self.steps += 1
        self.device_free = max(self.device_free, self.clock.now) + self.step_s
        return self.device_free

    def fetch(self, done_at):
        self.clock.now = max(self.clock.now, done_at)
        return {"loss": 3.0, "ce_loss": 3.0, "grad_norm": 1.0}

    def evaluate(self, batches):
        self.clock.now = max(self.clock.now, self.device_free)
        self.clock.now += self.eval_s + (self.eval_compile_s if self.evals == 0 else 0)
        self.evals += 1
        return {"loss": 3.0, "tokens": 1}

    def sample(self, prompt, n_tokens, top_k, temperature, seed):
        return [65] * n_tokens

    def latest_checkpoint(self, log_dir):
        return None

    def save(self, log_dir, step, meta):
        self.clock.now += 0.2

    def export_final(self, path, step):
        pass

    def finish(self):
        pass


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def run_with_fake_clock(monkeypatch, text_file, log_dir, steps, **timing):
    clock = FakeClock()
    monkeypatch.setattr(step_log, "CLOCK", clock)
    shown = []  # (clock at the print, step, eta, first) per progress line
    progress = metrics.MetricsLogger.progress

    def spy(self, record, eta=None, first=None):
        shown.append((clock.now, record["step"], eta, first))
        progress(self, record, eta=eta, first=first)

    monkeypatch.setattr(metrics.MetricsLogger, "progress", spy)
    argv = ["--framework", "jax", "--model", "gpt", "--n_layer", "1", "--n_embd", "32",
            "--n_head", "2", "--block_size", "32", "--data", text_file, "--log_dir", str(log_dir),
            "--B", "2", "--T", "16", "--total_batch_size", "64", "--max_steps", str(steps),
            "--warmup_steps", "1", "--eval_interval", "25", "--eval_steps", "1",
            "--ckpt_interval", "50", "--sample_tokens", "2"]
    train_loop.run(argv, FakeBackend(clock, **timing))
    return shown


@pytest.mark.parametrize("steps,timing", [
    (200, {}),                                   # the CPU preset: compiling >> a step
    (10, {"compile_s": 20.0, "step_s": 0.4}),     # a short run ("eta 16:21 for 10 steps")
    (120, {"step_s": 0.05, "eval_s": 0.6}),       # evals a third of the time
])
def test_eta_is_within_2x_of_the_time_left_from_step_2(monkeypatch, tmp_path, text_file, capsys,
                                                       steps, timing):
    shown = run_with_fake_clock(monkeypatch, text_file, tmp_path / "log", steps, **timing)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if re.match(r"step +\d+/", x)]
    assert [s for _, s, _, _ in shown] == list(range(steps)) and len(lines) == steps
    # the first line names the compile and its time, once, and extrapolates nothing
    assert re.search(r"\| compiling: \d+\.\d s$", lines[0]), lines[0]
    assert "tok/s" not in lines[0] and "eta" not in lines[0] and " ms" not in lines[0]
    assert sum("compiling" in x for x in lines) == 1
    assert all("tok/s" in x and "eta" in x for x in lines[1:])
    # the ETA counts down to the last step's metrics (the final eval and sample follow); it
    # learns what evals cost from the steps that contain one, so it holds while evals take
    # less time than the steps (not when they dominate: then it is low until the first)
    end = shown[-1][0]
    for now, step, eta, _ in shown[2:]:
        left = end - now
        assert left / 2 - 1e-9 <= eta <= 2 * left + 1e-9, (step, eta, left)


def test_a_torch_cpu_run_calls_its_first_step_no_compile(monkeypatch, tmp_path, text_file, capsys):
    class EagerBackend(FakeBackend):
        name = "torch"

    clock = FakeClock()
    monkeypatch.setattr(step_log, "CLOCK", clock)
    train_loop.run(["--framework", "torch", "--model", "gpt", "--n_layer", "1", "--n_embd", "32",
                    "--n_head", "2", "--block_size", "32", "--data", text_file, "--log_dir",
                    str(tmp_path / "log"), "--B", "2", "--T", "16", "--total_batch_size", "64",
                    "--max_steps", "3", "--eval_steps", "1", "--sample_tokens", "2"],
                   EagerBackend(clock, compile_s=0.0))
    out = capsys.readouterr().out
    assert "first step: " in out and "compiling" not in out


def test_timer_without_later_steps_gives_no_eta():
    clock = FakeClock()
    timer = step_log.StepTimer(clock)
    clock.now += 50
    assert timer.tick() == (50, True) and timer.eta(10) is None
    clock.now += 2
    assert timer.tick() == (2, False) and timer.eta(10) == 20
    clock.now += 4
    timer.tick()
    assert timer.eta(3) == pytest.approx(9)  # the mean of 2 and 4, not the first step's 50
    assert np.isclose(timer.eta(0), 0)


def test_stop_at_names_the_last_step_printed(monkeypatch, tmp_path, text_file, capsys):
    clock = FakeClock()
    monkeypatch.setattr(step_log, "CLOCK", clock)
    train_loop.run(["--framework", "jax", "--model", "gpt", "--n_layer", "1", "--n_embd", "32",
                    "--n_head", "2", "--block_size", "32", "--data", text_file, "--log_dir",
                    str(tmp_path / "stop"), "--B", "2", "--T", "16", "--total_batch_size", "64",
                    "--max_steps", "10", "--stop_at", "5", "--eval_steps", "1"],
                   FakeBackend(clock, compile_s=1.0))
    out = capsys.readouterr().out.splitlines()
    printed = [x for x in out if re.match(r"step +\d+/", x)]
    assert printed[-1].startswith("step     4/10")
    assert "Stopped after 5 steps as asked (the last printed: step 4)" in out[-1]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_the_suggested_exports_run_and_stay_in_the_log_folder(framework, tmp_path, monkeypatch):
    """The "Next:" export commands, run as printed, write inside the run's folder (ignored by
    git with it) and work on what a finished run leaves there."""
    import shlex

    import jax.numpy as jnp
    import torch
    from helpers import jax_twin, random_torch_model

    from conversion.cli import main as conversion_main
    from nanomoe import GPTConfig, next_steps
    from nanomoe.cli import parse_args
    from nanomoe_jax.checkpoint import save_model

    log = tmp_path / "log"
    size = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=256)
    tm = random_torch_model(GPTConfig(**size))
    if framework == "jax":
        save_model(jax_twin(tm, dtype=jnp.float32), str(log), 4, {"tokenizer": "byte"})
    else:
        log.mkdir()
        torch.save({"model": tm.state_dict(), "config": size, "step": 4}, log / "model_final.pt")
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--model", "gpt", "--log_dir", "log", "--max_steps", "4"])
    text = next_steps.text(args, framework, "byte")
    commands = [x.split(None, 1)[1] if x.lstrip().startswith("export") else x.strip()
                for x in text.splitlines() if "python -m conversion" in x]
    assert len(commands) == 2
    before = set(os.listdir(tmp_path))
    for command in commands:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "conversion"]
        out = argv[argv.index("--out") + 1]
        assert os.path.commonpath([os.path.abspath(out), str(log)]) == str(log), command
        assert conversion_main(argv[3:]) == 0, command
    assert set(os.listdir(tmp_path)) == before  # nothing beside the run's folder
    assert {"hf", "safetensors"} <= set(os.listdir(log))
    assert (log / "hf" / "tokenizer.json").is_file()


def test_the_samplers_help_shows_their_defaults():
    from nanomoe.sampling_cli import make_parser

    text = " ".join(make_parser("sample").format_help().split())
    for default in ("--prompt PROMPT default: \"Hello, I'm a language model,\"",
                    "--max_new_tokens MAX_NEW_TOKENS default: 100", "--top_k TOP_K default: 50",
                    "(default: 1.0)"):
        assert default in text, default


def test_what_readme_commands_write_is_ignored_by_git():
    """Every relative --out / --log_dir in README's shell blocks, the runs its conversion
    examples read (log_gpt, ...: a user trains them first) and train.py's default folder are
    in .gitignore, so the first hour leaves `git status` clean."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    paths = {"log"}  # train.py's --log_dir default
    for block in blocks:
        paths.update(re.findall(r"--(?:out|log_dir)\s+([^\s#]+)", block))
        paths.update(re.findall(r"python -m conversion \S+\s+(log\w*)", block))
    paths = {p for p in paths if not p.startswith(("/", "~", "$"))
             and p != "benchmarks/results"}  # the explicit "commit a reference result"
    assert {"gpt-hf", "moe.pt", "log_gpt2", "log_moe"} <= paths  # the parse found them
    for path in sorted(paths):
        probe = path if path.endswith(".pt") else f"{path}/config.json"  # a file written there
        r = subprocess.run(["git", "check-ignore", "-q", probe], cwd=root)
        assert r.returncode == 0, f"{path} (a README command writes it) is not in .gitignore"
