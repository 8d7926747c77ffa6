"""A run's folder is its own: --overwrite replaces all of it, one process at a time, --resume
keeps what the run computes, every flag in range, and a failing disk or an early signal gets
one sentence (issue 12)."""

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanomoe import run_dir
from nanomoe.train_loop import main
from test_reliability import (TEXT, _backend, complete_checkpoints, snapshot, step_losses,  # noqa: F401
                              text_file, tiny, train_cmd)  # text_file: the shared fixture


def one_sentence(err: str, *words: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def checkpoint_steps(framework, log) -> list[int]:
    names = complete_checkpoints(framework, log)  # "3" (JAX) or "model_000003.pt" (torch)
    return sorted(int(n.removeprefix("model_").removesuffix(".pt")) for n in names)


def run(framework, argv, capsys):
    code = main(argv, lambda: _backend(framework))
    return code, capsys.readouterr().err


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


# disks, folders, memory, signals -------------------------------------------------------------

def test_a_torn_metrics_line_does_not_stop_resume(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend("jax")) == 0
    with open(log / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.1, "lr"')  # killed in the middle of a write
    assert main(tiny("jax", text_file, log, "--resume", steps=6), lambda: _backend("jax")) == 0
    assert [s for s, _ in step_losses(log)] == list(range(6))


def with_file_size_limit(cmd, kib):
    """cmd under ``ulimit -f``: bigger files fail with EFBIG, as on a full disk or quota."""
    return ["bash", "-c", f'ulimit -f {kib} && exec "$@"', "bash", *cmd]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_write_that_fails_mid_way_is_one_sentence(framework, text_file, tmp_path):
    """The disk refuses a checkpoint while it is being written (a file-size limit stands in
    for a full disk or quota: EFBIG): one sentence, exit 2, no debris beside the checkpoints."""
    log = tmp_path / "log"
    assert subprocess.run(train_cmd(tiny(framework, text_file, log, "--stop_at", "3", steps=9)),
                          capture_output=True).returncode == 0
    before = {n: d for n, d in snapshot(log).items() if n.startswith(("checkpoints", "model_0"))}
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = train_cmd(tiny(framework, text_file, log, "--resume", steps=9))
    out = subprocess.run(with_file_size_limit(cmd, 60), capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    one_sentence(out.stderr, "could not write", "intact")
    after = snapshot(log)
    assert all(after[n] == d for n, d in before.items())
    assert not [n for n in after if n.endswith(".tmp")]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_full_disk_is_refused_before_the_checkpoint_starts(framework, text_file, tmp_path,
                                                            capsys, monkeypatch):
    log = tmp_path / "log"
    assert main(tiny(framework, text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend(framework)) == 0
    capsys.readouterr()
    before = snapshot(log)
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, err = run(framework, tiny(framework, text_file, log, "--resume", steps=6), capsys)
    assert code == 2
    one_sentence(err, "MiB free", "free some disk space", "intact")
    after = snapshot(log)
    assert all(after[n] == d for n, d in before.items() if n.startswith(("checkpoints", "model_")))


def test_an_unwritable_log_dir_is_one_sentence(text_file, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    log.mkdir()
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, err = run("jax", tiny("jax", text_file, log), capsys)
    assert code == 2
    one_sentence(err, "Read-only file system", "writable --log_dir")
    assert os.listdir(log) == []


def test_a_model_too_big_for_memory_is_refused_before_allocating(text_file, tmp_path, capsys):
    code, err = run("jax", tiny("jax", text_file, tmp_path / "log", "--n_layer", "64",
                                "--n_embd", "16384", "--n_head", "128"), capsys)
    assert code == 2
    one_sentence(err, "GiB", "smaller model")
    assert not (tmp_path / "log").exists()


def test_out_of_memory_during_setup_is_one_sentence(text_file, tmp_path, capsys):
    class Exhausted:
        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __init__(self):
            self.inner = _backend("jax")

        def setup(self, config, args):
            raise MemoryError("Unable to allocate 96.0 GiB")

    code = main(tiny("jax", text_file, tmp_path / "log"), Exhausted)
    one_sentence(capsys.readouterr().err, "out of memory", "--B")
    assert code == 2 and not (tmp_path / "log").exists()


def test_ctrl_c_before_the_first_step(text_file, tmp_path, capsys):
    class Interrupting:  # the signal arrives while the model is being built
        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __init__(self):
            self.inner = _backend("jax")

        def setup(self, config, args):
            self.inner.setup(config, args)
            os.kill(os.getpid(), signal.SIGINT)

    code = main(tiny("jax", text_file, tmp_path / "log"), Interrupting)
    assert code == 130
    one_sentence(capsys.readouterr().err, "SIGINT", "nothing was written")
    assert not (tmp_path / "log").exists()
    # and during the imports, before the run exists at all (a KeyboardInterrupt raised in a
    # library's callback there used to be swallowed, and the run went on)
    for delay in (0.3, 1.0):
        proc = subprocess.Popen(train_cmd(tiny("jax", text_file, tmp_path / "log2")),
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == 130, err
        one_sentence(err, "SIGINT")
        assert not (tmp_path / "log2").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0"]))


# more of the same classes (a review's findings) ---------------------------------------------

def test_special_files_in_a_run_folder_are_refused_not_opened(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend("jax")) == 0
    capsys.readouterr()
    meta = next(p for p in (log / "checkpoints").rglob("*") if p.is_file())
    for victim in (log / "metrics.jsonl", log / "run.json", meta):
        saved = victim.read_bytes()
        victim.unlink()
        os.mkfifo(victim)  # opening it for reading would block forever
        code, err = run("jax", tiny("jax", text_file, log, "--resume", steps=6), capsys)
        assert code == 2
        one_sentence(err, str(victim), "not a regular file")
        victim.unlink()
        victim.write_bytes(saved)


def test_broken_symlink_log_dir_and_huge_seed(text_file, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    code, err = run("jax", tiny("jax", text_file, link), capsys)
    assert code == 2
    one_sentence(err, "symbolic link to nothing")
    code, err = run("jax", tiny("jax", text_file, tmp_path / "log", "--seed",
                                "99999999999999999999"), capsys)
    assert code == 2
    one_sentence(err, "--seed must be at most")


def test_eval_batches_are_read_one_at_a_time():
    from nanomoe.loader import LazyBatches

    reads = []

    class Loader:
        def next_batch(self):
            reads.append(1)
            return len(reads), len(reads)

    batches = LazyBatches(Loader(), 10**9)  # a huge --eval_steps allocates nothing up front
    assert len(batches) == 10**9 and reads == []
    first_three = list(itertools.islice(batches, 3))
    assert [x for x, _ in first_three] == [1, 2, 3] and len(reads) == 3
