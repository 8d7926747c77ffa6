"""Bad input to train.py: missing or short data, ids past the vocabulary, impossible batch
shapes, a checkpoint of another model, an existing run without --resume or --overwrite, unknown
flags, and any data-loader shapes: each is one sentence, exit 2, and touches nothing."""

import os
import subprocess

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe.errors import DataError
from nanomoe.loader import DataLoader
from nanomoe.train_loop import main
from helpers import _backend, snapshot, text_file, tiny, train_cmd  # noqa: F401 - a fixture


def write_npy_shards(folder, n_tokens=4000, high=256, val=True, train=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    if val:
        np.save(os.path.join(folder, "x_val_000000.npy"), rng.integers(0, high, n_tokens).astype(np.uint16))
    if train:
        np.save(os.path.join(folder, "x_train_000001.npy"), rng.integers(0, high, n_tokens).astype(np.uint16))
    return str(folder)


def bad_inputs(tmp, text_file):
    """(name, argv, words the one-sentence message must contain); log folder = tmp/'log'."""
    log = tmp / "log"
    empty = tmp / "empty"
    empty.mkdir()
    short = write_npy_shards(tmp / "short", n_tokens=20)
    only_train = write_npy_shards(tmp / "only_train", val=False)
    big_ids = write_npy_shards(tmp / "big_ids", high=60000)
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    other_model = tmp / "gpt.pt"
    from nanomoe import GPTConfig, config_to_dict
    import nanomoe_torch

    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=256)
    torch.save({"model": nanomoe_torch.GPT(cfg).state_dict(), "config": config_to_dict(cfg)},
               other_model)
    base = lambda *a: tiny("jax", text_file, log, *a)  # noqa: E731
    return [
        ("missing data", [*base(), "--data", str(tmp / "nope")], ["nope", "does not exist"]),
        ("empty data folder", [*base(), "--data", str(empty), "--tokenizer", "byte"], ["empty"]),
        ("no val shards", [*base(), "--data", only_train, "--tokenizer", "byte"], ["val"]),
        ("shard too short", [*base(), "--data", short, "--tokenizer", "byte"], ["--B"]),
        ("ids >= vocab", [*base(), "--data", big_ids, "--tokenizer", "byte"], ["vocab_size"]),
        ("T > block_size", [*base(), "--T", "64"], ["block_size"]),
        ("batch not divisible", [*base(), "--total_batch_size", "100"], ["divisible"]),
        ("resume nothing", [*base(), "--resume"], ["--resume"]),
        ("init_from other model", [*base(), "--init_from", str(other_model)], ["missing"]),
        ("init_from truncated", [*base(), "--init_from", str(truncated)], ["truncated.pt"]),
        ("bad config", [*base(), "--n_head", "3"], ["n_head"]),
    ]


def test_bad_input_gets_one_sentence_and_touches_nothing(text_file, tmp_path, capsys):
    # a finished run in the log folder: nothing may change it
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, steps=3), lambda: _backend("jax")) == 0
    capsys.readouterr()
    before = snapshot(log)
    cases = bad_inputs(tmp_path, text_file)
    for name, argv, words in cases:
        if name == "resume nothing":
            argv = [a if a != str(log) else str(tmp_path / "fresh") for a in argv]
        code = main(argv + ["--overwrite"] if name not in ("resume nothing",) else argv,
                    lambda: _backend("jax"))
        err = capsys.readouterr().err
        assert code == 2, name
        # one sentence; a weights mismatch then lists the keys, one per line, as asked
        assert err.startswith("error: ") and (err.count("\n") == 1 or "init_from" in name), err
        assert "Traceback" not in err
        for word in words:
            assert word in err, (name, err)
        assert snapshot(log) == before, name


def test_existing_run_without_resume_or_overwrite(text_file, tmp_path, capsys):
    log = tmp_path / "log"
    assert main(tiny("jax", text_file, log, steps=2), lambda: _backend("jax")) == 0
    before = snapshot(log)
    capsys.readouterr()
    assert main(tiny("jax", text_file, log, steps=2), lambda: _backend("jax")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(tiny("jax", text_file, log, "--resume", "--n_layer", "2", steps=2),
                lambda: _backend("jax")) == 2
    assert "another config" in capsys.readouterr().err
    assert snapshot(log) == before


def test_unknown_flag_and_model_exit_nonzero_without_traceback(text_file):
    for argv in (["--modle", "gpt"], ["--model", "gpt3"]):
        out = subprocess.run(train_cmd(argv), capture_output=True, text=True)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr and "error:" in out.stderr


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(-2, 300), min_size=0, max_size=4),
       B=st.integers(-1, 6), T=st.integers(-1, 40), rank=st.integers(-1, 3),
       world=st.integers(-1, 4), steps=st.integers(0, 12))
def test_data_loader_works_or_says_why(lengths, B, T, rank, world, steps):
    """Any shapes: the loader either yields (B, T) windows of the shards' tokens or raises the
    project's DataError with a message."""
    shards = [np.arange(max(n, 0), dtype=np.uint16) for n in lengths]
    try:
        loader = DataLoader(shards, B, T, rank, world)
        for _ in range(steps):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T)
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    except DataError as e:
        assert str(e)
