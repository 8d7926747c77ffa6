"""Runs that meet a failing world get one sentence and keep what was saved (issue 12): a torn
metrics line, a write that fails mid-way, a full or read-only disk, a model too big for memory,
Ctrl-C before the first step, special files or broken links in a run folder, a huge seed, and
eval batches read one at a time."""

import errno
import itertools
import os
import signal
import subprocess
import time

import pytest

from nanomoe.train_loop import main
from helpers import (_backend, one_sentence, run, snapshot, step_losses,  # noqa: F401
                     text_file, tiny, train_cmd)  # text_file: the shared fixture


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
