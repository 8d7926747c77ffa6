"""A run's folder is its own: --overwrite replaces all of it, one process at a time, --resume
keeps what the run computes, and every flag is in range (issue 12). Failing disks, memory,
signals and special files are in test_run_failures.py."""

import json
import subprocess
import sys

import pytest

from nanomoe import run_dir
from nanomoe.train_loop import main
from helpers import (TEXT, _backend, checkpoint_steps, complete_checkpoints,  # noqa: F401
                     one_sentence, run, snapshot, step_losses, text_file, tiny, train_cmd)
# text_file: the shared fixture; one_sentence, checkpoint_steps, run: test_safety_runs imports
# them from here


# --overwrite ----------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_overwrite_leaves_nothing_of_the_old_run(framework, text_file, tmp_path, capsys):
    log = tmp_path / "log"
    # the old run: checkpoints after steps 3 and 6, a final export
    assert main(tiny(framework, text_file, log, steps=6), lambda: _backend(framework)) == 0
    (log / "notes.txt").write_text("mine")  # not a run's artifact: must survive
    # the new run (other seed) stops after step 3: the old run's step 6 must not survive, nor
    # its step 3 weights, metrics or model_final.pt
    assert main(tiny(framework, text_file, log, "--overwrite", "--seed", "7", "--stop_at", "3",
                     steps=6), lambda: _backend(framework)) == 0
    capsys.readouterr()
    assert checkpoint_steps(framework, log) == [3]
    assert not (log / "model_final.pt").exists()
    assert [s for s, _ in step_losses(log)] == [0, 1, 2]
    assert (log / "notes.txt").read_text() == "mine"
    assert json.loads((log / "run.json").read_text())["flags"]["seed"] == 7
    # --resume continues the new run (seed 7), not the old one
    assert main(tiny(framework, text_file, log, "--resume", "--seed", "7", steps=6),
                lambda: _backend(framework)) == 0
    assert [s for s, _ in step_losses(log)] == list(range(6))


def test_keep_checkpoints_means_the_same_in_both_frameworks(text_file, tmp_path, capsys):
    kept = {}
    for framework in ("jax", "torch"):
        log = tmp_path / framework
        assert main(tiny(framework, text_file, log, "--keep_checkpoints", "2",
                         "--ckpt_interval", "2", steps=8), lambda: _backend(framework)) == 0
        kept[framework] = len(complete_checkpoints(framework, log))
    assert kept == {"jax": 2, "torch": 2}
    code, err = run("jax", tiny("jax", text_file, tmp_path / "zero", "--keep_checkpoints", "0"),
                    capsys)
    assert code == 2
    one_sentence(err, "--keep_checkpoints", "at least 1")
    assert not (tmp_path / "zero").exists()


# one run per folder --------------------------------------------------------------------------

def test_a_folder_in_use_is_refused_and_untouched(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, steps=3), lambda: _backend("jax")) == 0
    capsys.readouterr()
    before = snapshot(log)
    holder = run_dir.Lock(str(log)).acquire()  # another process's run, as far as flock knows
    try:
        for extra in (["--resume", "--stop_at", "4"], ["--overwrite"]):
            code, err = run("jax", tiny("jax", text_file, log, *extra, steps=6), capsys)
            assert code == 2
            one_sentence(err, "in use by another training run")
            assert snapshot(log) == before
    finally:
        holder.release()


def test_two_processes_on_one_folder_and_no_stuck_lock(text_file, tmp_path):
    log = tmp_path / "log"
    first = subprocess.Popen(train_cmd(tiny("torch", text_file, log, "--ckpt_interval", "2",
                                            steps=100000)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # running, with a checkpoint written
            if line.startswith("step     3/"):
                break
        second = subprocess.run(train_cmd(tiny("torch", text_file, log, "--resume",
                                               steps=100000)),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        one_sentence(second.stderr, "in use by another training run")
    finally:
        first.kill()  # SIGKILL: the lock must not outlive the process
        first.wait(timeout=60)
    third = subprocess.run(train_cmd(tiny("torch", text_file, log, "--resume", "--stop_at", "5",
                                          steps=100000)),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "Resumed" in third.stdout


# --resume keeps what the run computes --------------------------------------------------------

def test_resume_refuses_flags_that_change_the_run_and_names_them(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    base = lambda *a, steps=12: tiny("jax", text_file, log, *a, steps=steps)  # noqa: E731
    assert main(base("--stop_at", "3"), lambda: _backend("jax")) == 0
    capsys.readouterr()
    before = snapshot(log)
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT.upper())
    changes = [(["--max_lr", "1e-3"], "--max_lr"), (["--min_lr", "1e-5"], "--min_lr"),
               (["--B", "4", "--total_batch_size", "128"], "--B"),
               (["--T", "8"], "--T"), (["--dtype", "bfloat16"], "--dtype"),
               (["--data", str(other_text)], "--data"), (["--seed", "3"], "seed")]
    for extra, name in changes:
        code, err = run("jax", base("--resume", *extra), capsys)
        assert code == 2, name
        one_sentence(err, name)
        assert snapshot(log) == before, name
    code, err = run("jax", base("--resume", steps=20), capsys)
    assert code == 2
    one_sentence(err, "--max_steps: 12 -> 20")
    # a config change names the field that differs, not both whole configs
    code, err = run("jax", base("--resume", "--n_layer", "2"), capsys)
    one_sentence(err, "n_layer: 1 -> 2")
    assert "vocab_size" not in err
    # flags that only change how it runs stay free
    assert main(base("--resume", "--eval_interval", "5", "--ckpt_interval", "4",
                     "--scan_layers", "false", "--stop_at", "6"), lambda: _backend("jax")) == 0


# every number in range -----------------------------------------------------------------------

BAD_NUMBERS = [
    (["--max_lr", "-1"], "--max_lr"), (["--max_lr", "nan"], "--max_lr"),
    (["--max_lr", "inf"], "--max_lr"),
    (["--min_lr", "1.0"], "--min_lr"), (["--min_lr", "-0.00001"], "--min_lr"),
    (["--max_steps", "-3"], "--max_steps"), (["--max_steps", "0"], "--max_steps"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--B", "0"], "--B"), (["--T", "0"], "--T"), (["--total_batch_size", "0"], "--total_batch_size"),
    (["--eval_interval", "0"], "--eval_interval"), (["--eval_steps", "0"], "--eval_steps"),
    (["--ckpt_interval", "0"], "--ckpt_interval"), (["--stop_at", "0"], "--stop_at"),
    (["--sample_tokens", "-1"], "--sample_tokens"), (["--skip_nonfinite", "-1"], "--skip_nonfinite"),
    (["--embedding_lr_mult", "nan"], "--embedding_lr_mult"),
    (["--loss_chunk_tokens", "0"], "--loss_chunk_tokens"), (["--seed", "-1"], "--seed"),
    (["--n_layer", "0"], "n_layer"), (["--n_embd", "-32"], "n_embd"),
    (["--capacity_factor", "nan"], "capacity_factor"), (["--route_scale", "inf"], "route_scale"),
]


def test_bad_numbers_get_one_sentence_and_write_nothing(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    for extra, name in BAD_NUMBERS:
        code, err = run("jax", tiny("jax", text_file, log, *extra), capsys)
        assert code == 2, extra
        one_sentence(err, name)
        assert not log.exists(), extra  # so the corrected command needs no --overwrite
    assert main(tiny("jax", text_file, log, steps=2), lambda: _backend("jax")) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0"]))
