"""Reliability: SIGKILL at random moments, SIGTERM, non-finite steps and a full disk; the
shared run builders live in helpers.py (test_run_safety and test_safety_runs import them from
here too)."""

import errno
import json
import os
import random
import signal
import subprocess

import numpy as np
import pytest
import torch

from nanomoe.schedule import lr_at
from nanomoe import train_loop
from nanomoe.train_loop import main
from helpers import (TEXT, _backend, complete_checkpoints, snapshot, step_losses,  # noqa: F401
                     text_file, tiny, train_cmd)  # text_file: the shared fixture


def final_weights(log_dir):
    return torch.load(os.path.join(log_dir, "model_final.pt"), weights_only=True)["model"]


def run_until_killed(args, kill_after_step):
    """Start train.py, SIGKILL it as soon as it prints the line of ``kill_after_step``."""
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith(f"step {kill_after_step:5d}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    return proc.returncode


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(framework, text_file, tmp_path):
    steps = 24
    ref = tmp_path / "ref"
    assert subprocess.run(train_cmd(tiny(framework, text_file, ref, steps=steps)),
                          capture_output=True).returncode == 0
    log = tmp_path / "killed"
    rng = random.Random(framework)
    # checkpoints are written after steps 2, 5, 8, ...: kill right there (during the save) and
    # at random other steps; each time resume from whatever complete checkpoint survived (the
    # first kill comes after the first checkpoint: with none, --resume rightly refuses)
    kills = [5, rng.randrange(6, 11), rng.randrange(14, 21)]
    if framework == "torch":  # write-then-rename has one path to test; orbax's async more
        kills = [5, rng.randrange(13, 21)]
    for k in kills:
        # an async save may not have finalised before the kill: with no complete checkpoint a
        # user starts over, and --resume says so
        extra = ["--resume"] if complete_checkpoints(framework, log) else ["--overwrite"]
        assert run_until_killed(tiny(framework, text_file, log, *extra, steps=steps), k) == -9
    done = subprocess.run(train_cmd(tiny(framework, text_file, log, "--resume", steps=steps)),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got, want = step_losses(log), step_losses(ref)
    assert [s for s, _ in got] == list(range(steps))  # every step exactly once
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-6)
    a, b = final_weights(log), final_weights(ref)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sigterm_saves_and_exits_zero(framework, text_file, tmp_path):
    log = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny(framework, text_file, log, "--ckpt_interval", "1000",
                                           steps=5000)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     4/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    out = "".join(lines)
    assert "Stopped by SIGTERM" in out and "--resume" in out
    resumed = subprocess.run(train_cmd(tiny(framework, text_file, log, "--resume",
                                            "--stop_at", "12", steps=5000)),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed" in resumed.stdout
    steps = [s for s, _ in step_losses(log)]
    assert steps == list(range(12))


def infinite_lr_at(monkeypatch, bad_step):
    """The fault, injected from here: the loop's learning rate is infinite at ``bad_step``
    (its update makes the weights non-finite: the backend must refuse the step)."""
    monkeypatch.setattr(train_loop, "lr_at", lambda step, *a: (
        float("inf") if step == bad_step else lr_at(step, *a)))


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_nan_stops_and_keeps_the_last_good_checkpoint(framework, text_file, tmp_path, capsys,
                                                      monkeypatch):
    log = tmp_path / "run"
    infinite_lr_at(monkeypatch, 7)
    assert main(tiny(framework, text_file, log), lambda: _backend(framework)) == 2
    err = capsys.readouterr().err
    assert "step 7" in err or "step 8" in err  # torch notices on the step after the bad update
    assert "last good checkpoint is step 6" in err
    # the last good checkpoint is there, finite, and resumable
    monkeypatch.setattr(train_loop, "lr_at", lr_at)
    assert main(tiny(framework, text_file, log, "--resume"), lambda: _backend(framework)) == 0
    for value in final_weights(log).values():
        assert torch.isfinite(value).all()


def test_skip_nonfinite_skips_and_counts(text_file, tmp_path, monkeypatch):
    infinite_lr_at(monkeypatch, 5)
    assert main(tiny("jax", text_file, tmp_path, "--skip_nonfinite", "1", steps=8),
                lambda: _backend("jax")) == 0
    records = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert [r["skipped"] for r in records] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert records[-1]["skipped_steps"] == 1


def test_an_update_that_overflows_the_weights_stops_even_when_skips_are_allowed(
        text_file, tmp_path, capsys, monkeypatch):
    """The JAX step decides the skip before the update (from the loss, gradient norm and lr);
    a finite lr whose update still overflows fp32 cannot be skipped afterwards: it stops."""
    f32_max = float(np.finfo(np.float32).max)
    monkeypatch.setattr(train_loop, "lr_at", lambda step, *a: (
        f32_max if step == 5 else lr_at(step, *a)))
    log = tmp_path / "run"
    code = main(tiny("jax", text_file, log, "--skip_nonfinite", "3", steps=8),
                lambda: _backend("jax"))
    err = capsys.readouterr().err
    assert code == 2 and "step 5: the update at learning rate 3.403e+38 made the weights" in err
    records = [r for r in map(json.loads, open(log / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # step 5 never logged as trained
    assert all("nonfinite_weights" not in r for r in records)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_disk_full_keeps_the_previous_checkpoint(framework, text_file, tmp_path, capsys,
                                                 monkeypatch):
    log = tmp_path / "run"
    assert main(tiny(framework, text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend(framework)) == 0
    capsys.readouterr()
    before = snapshot(log)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if framework == "jax":
        import nanomoe_jax.checkpoint as ckpt

        monkeypatch.setattr(ckpt, "save", full)
    else:
        monkeypatch.setattr(torch, "save", full)
    code = main(tiny(framework, text_file, log, "--resume", steps=6), lambda: _backend(framework))
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "intact" in err
    after = snapshot(log)
    for name, digest in before.items():  # what was saved before is untouched
        if name.startswith(("checkpoints", "model_0")):
            assert after[name] == digest, name
