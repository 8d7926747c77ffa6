"""Issue 21, training side, through train.py's entry point: each bad input is one sentence,
exit 2, before anything is written, and no run is deleted or mixed with another."""

import json
import os

import pytest

from nanomoe.train_loop import main
from helpers import (_backend, checkpoint_steps, fail_if_blocked, one_sentence, run,  # noqa: F401
                     step_losses, text_file, tiny)


def snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            out[p] = open(p, "rb").read() if os.path.isfile(p) else "special"
    return out


@pytest.fixture(scope="module")
def jax_run(text_file, tmp_path_factory):
    """A JAX run stopped after step 3 of 6 (checkpoint 3): copied by each test that damages it."""
    log = tmp_path_factory.mktemp("runs") / "base"
    assert main(tiny("jax", text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend("jax")) == 0
    return log


def copy_of(log, dest):
    import shutil

    shutil.copytree(log, dest, symlinks=True)
    return dest


@pytest.fixture
def alarm():
    with fail_if_blocked(60):
        yield


@pytest.mark.parametrize("flags, words", [
    (["--capacity_factor", "1e308"], "--capacity_factor must be at most"),
    (["--n_layer", "2147483647"], "GiB"),
    (["--max_lr", "1e308"], "beyond float32"),
    (["--sample_prompt", ""], "--sample_prompt is empty"),
    (["--sample_prompt", "\udcff"], "--sample_prompt is not valid UTF-8"),
    (["--resume", "--init_from", "x.pt"], "would be ignored"),
])
def test_bad_values_are_refused_before_anything_is_written(text_file, tmp_path, capsys, flags,
                                                          words, alarm):
    log = tmp_path / "log"
    code, err = run("jax", tiny("jax", text_file, log, *flags), capsys)
    assert code == 2
    one_sentence(err, words)
    assert not log.exists()


def test_an_empty_log_dir_is_not_the_current_folder(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run("jax", tiny("jax", text_file, ""), capsys)
    assert code == 2
    one_sentence(err, "--log_dir is empty")
    assert os.listdir(tmp_path) == []


def test_overwrite_never_deletes_the_weights_init_from_names(jax_run, tmp_path, text_file, capsys):
    log = copy_of(jax_run, tmp_path / "log")
    before = snapshot(log)
    for init in (log, log / "checkpoints" / "3"):
        code, err = run("jax", tiny("jax", text_file, log, "--overwrite", "--init_from",
                                    str(init), steps=6), capsys)
        assert code == 2
        one_sentence(err, "--overwrite would delete", "copy the weights out")
    assert snapshot(log) == before


def test_resume_on_data_changed_in_place_is_refused(jax_run, tmp_path, text_file, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes(open(text_file, "rb").read())
    log = tmp_path / "log"
    assert main(tiny("jax", str(data), log, "--stop_at", "3", steps=6),
                lambda: _backend("jax")) == 0
    capsys.readouterr()
    recorded = json.loads((log / "run.json").read_text())["data_files"]
    assert list(recorded) == [str(data)] and recorded[str(data)]["size"] == data.stat().st_size
    data.write_text(data.read_text().replace("fox", "cat"))  # same size, other tokens
    before = snapshot(log)
    code, err = run("jax", tiny("jax", str(data), log, "--resume", steps=6), capsys)
    assert code == 2
    one_sentence(err, str(data), "changed since")
    assert snapshot(log) == before


def damage_meta(log, **fields):
    meta = next(p for p in (log / "checkpoints").rglob("metadata") if p.parent.name == "meta")
    content = json.loads(meta.read_text())
    content.update(fields)
    for k, v in fields.items():
        if v is None:
            del content[k]
    meta.write_text(json.dumps(content))


@pytest.mark.parametrize("fields, words", [
    ({"step": -3}, "step must be 3"),
    ({"step": "3"}, "step must be 3"),
    ({"data": None}, "data position must be a mapping"),
    ({"data": {"shard": "0", "position": 0}}, "shard must be a whole number"),
])
def test_damaged_checkpoint_metadata_is_one_sentence(jax_run, tmp_path, text_file, capsys,
                                                     fields, words):
    log = copy_of(jax_run, tmp_path / "log")
    damage_meta(log, **fields)
    before = snapshot(log)
    code, err = run("jax", tiny("jax", text_file, log, "--resume", steps=6), capsys)
    assert code == 2
    one_sentence(err, "checkpoint of step 3", words)
    assert snapshot(log) == before


@pytest.mark.parametrize("damage, words", [
    (lambda log: (log / "run.json").write_text(json.dumps({**json.loads(
        (log / "run.json").read_text()), "config": [1]})), "config must be a JSON object"),
    (lambda log: (log / "run.json").write_text(json.dumps({**json.loads(
        (log / "run.json").read_text()), "flags": "x"})), "flags must be a JSON object"),
    (lambda log: open(log / "metrics.jsonl", "a").write('{"step": null}\n'), "step must be"),
    (lambda log: [os.remove(log / "metrics.jsonl"), os.mkdir(log / "metrics.jsonl")],
     "should be a file"),
])
def test_damaged_run_files_are_one_sentence(jax_run, tmp_path, text_file, capsys, damage, words):
    log = copy_of(jax_run, tmp_path / "log")
    damage(log)
    code, err = run("jax", tiny("jax", text_file, log, "--resume", steps=6), capsys)
    assert code == 2
    one_sentence(err, words)
    assert "disk space" not in err


def test_a_fifo_in_a_symlinked_checkpoint_folder(jax_run, tmp_path, text_file, capsys, alarm):
    log = copy_of(jax_run, tmp_path / "log")
    (log / "checkpoints").rename(tmp_path / "elsewhere")
    (log / "checkpoints").symlink_to(tmp_path / "elsewhere")
    meta = next((tmp_path / "elsewhere").rglob("metadata"))
    meta.unlink()
    os.mkfifo(meta)
    code, err = run("jax", tiny("jax", text_file, log, "--resume", steps=6), capsys)
    assert code == 2
    one_sentence(err, "not a regular file")


def test_torch_resumes_in_a_folder_named_like_a_pattern(text_file, tmp_path, capsys):
    log = tmp_path / "run[1]"
    (tmp_path / "run1").mkdir()  # what run[1] matches as a pattern: must not be looked at
    assert main(tiny("torch", text_file, log, "--stop_at", "3", steps=6),
                lambda: _backend("torch")) == 0
    assert main(tiny("torch", text_file, log, "--resume", steps=6),
                lambda: _backend("torch")) == 0
    assert [s for s, _ in step_losses(log)] == list(range(6))
    assert checkpoint_steps("torch", log)[-1] == 6


def test_after_an_error_the_backend_is_closed_before_exit(text_file, tmp_path, capsys):
    """orbax's writer threads and event loop are stopped when an error ends the run, so
    nothing echoes "Event loop is closed" after the one sentence."""
    closed = []

    class Failing:
        def __init__(self):
            self.inner = _backend("jax")

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def setup(self, config, args):
            raise MemoryError("Unable to allocate")

        def close(self):
            closed.append(True)
            self.inner.close()

    assert main(tiny("jax", text_file, tmp_path / "log"), Failing) == 2
    one_sentence(capsys.readouterr().err, "out of memory")
    assert closed == [True]
