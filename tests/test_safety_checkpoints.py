"""Checkpoints, samplers and outputs against hostile or unlucky input: FIFOs anywhere in a JAX
checkpoint (symlinked folders too) for every loader, --compile_cache that is not a folder,
bad prompts and sizes in both samplers and compare, a tokenizer.json with no vocabulary, a
disk that fills up while a conversion verb writes."""

import gc
import os
import shutil
import subprocess
import sys
import time

import pytest

import conversion
import nanomoe_jax
from conversion.init_from import init_arrays
from nanomoe import ConfigError, ConversionError, GPTConfig
from nanomoe.errors import NanoMoeError
from nanomoe_jax.checkpoint import load_model, read_meta, save_model
from helpers import fail_if_blocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = GPTConfig(n_layer=1, n_embd=32, n_head=4, block_size=16, vocab_size=256)


@pytest.fixture(autouse=True)
def _no_hang():
    with fail_if_blocked(60):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "log")
    save_model(nanomoe_jax.create_model(GPT, 0), out, 2)
    return out


def _sample(framework, argv, capsys):
    from nanomoe.sampling_cli import main

    import importlib

    module = importlib.import_module(f"nanomoe_{framework}.sample")
    rc = main("sample", module.load_for_sampling,
              lambda m, ids, a, seed: module.generate(m, ids, a.max_new_tokens, top_k=a.top_k,
                                                      temperature=a.temperature, seed=seed),
              argv)
    return rc, capsys.readouterr().err


def _one_sentence(err, *words):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------
# special files in a JAX checkpoint


def _fifo_variants(ckpt, tmp_path):
    """(name, folder to load) for a FIFO in place of each metadata file, reached directly,
    through a symlinked step folder and through a symlinked checkpoints folder."""
    for name in ("meta/metadata", "_CHECKPOINT_METADATA", "params/_METADATA"):
        for how in ("direct", "linked_step", "linked_checkpoints"):
            base = tmp_path / f"{name.replace('/', '_')}-{how}"
            real = shutil.copytree(ckpt, str(base / "real"))
            victim = os.path.join(real, "checkpoints", "2", name)
            os.remove(victim)
            os.mkfifo(victim)
            if how == "direct":
                yield f"{name} {how}", real
                continue
            log = base / "log"
            (log / "checkpoints").mkdir(parents=True) if how == "linked_step" else log.mkdir()
            if how == "linked_step":
                os.symlink(os.path.join(real, "checkpoints", "2"), log / "checkpoints" / "2")
            else:
                os.symlink(os.path.join(real, "checkpoints"), log / "checkpoints")
            yield f"{name} {how}", str(log)


def test_a_fifo_anywhere_in_a_checkpoint_is_refused_by_every_loader(ckpt, tmp_path, capsys):
    for what, folder in _fifo_variants(ckpt, tmp_path):
        for load in (load_model, read_meta, init_arrays,
                     lambda p: conversion.load_source(p, log=lambda *_: None),
                     lambda p: conversion.to_torch(p, str(tmp_path / "o.pt"))):
            with pytest.raises(ConversionError, match="is a FIFO, not a regular file"):
                load(folder)
        rc, err = _sample("jax", ["--checkpoint", folder, "--prompt", "a"], capsys)
        assert rc == 2, what
        _one_sentence(err, "FIFO")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("field,value", [("n_layer", 100_000), ("n_embd", 2**28),
                                         ("vocab_size", 2**30), ("block_size", 2**20)])
def test_meta_asking_for_huge_dimensions_is_one_sentence(ckpt, tmp_path, capsys, monkeypatch,
                                                         field, value):
    import json

    log = shutil.copytree(ckpt, str(tmp_path / "log"))
    path = os.path.join(log, "checkpoints", "2", "meta", "metadata")
    meta = json.load(open(path))
    meta["config"][field] = value
    json.dump(meta, open(path, "w"))
    # orbax leaves its read coroutines unawaited when a restore fails: a short-lived command
    # drops them at exit, this long pytest process would report them later as "unraisable"
    monkeypatch.setattr(sys, "unraisablehook", lambda _: None)
    rc, err = _sample("jax", ["--checkpoint", log, "--prompt", "a"], capsys)
    for _ in range(3):  # orbax's threads may still hold some for a moment
        gc.collect()
        time.sleep(0.1)
    assert rc == 2
    _one_sentence(err, "could not restore the weights", "does not fit them")


# ---------------------------------------------------------------------------------------------
# --compile_cache


def test_compile_cache_that_is_not_a_folder_is_one_sentence(tmp_path, monkeypatch, capsys):
    from nanomoe_jax import compile_cache

    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    for name, kind in (("file", "a regular file"), ("fifo", "a FIFO"),
                       ("broken", "a link to nothing")):
        with pytest.raises(ConfigError, match=f"--compile_cache .*{name} is {kind}.*, not a fold"):
            compile_cache.enable(str(tmp_path / name))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    import jax

    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable(str(tmp_path / "file" / "below")) is None  # only the speed-up
    assert "cannot use it" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == before


# ---------------------------------------------------------------------------------------------
# prompts, sizes, tokenizers


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("prompt,why", [("", "is empty"), ("\udcff", "not valid UTF-8")])
def test_samplers_check_the_prompt_before_loading(framework, prompt, why, tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")  # never reached: the prompt comes first
    rc, err = _sample(framework, ["--checkpoint", missing, "--prompt", prompt], capsys)
    assert rc == 2
    _one_sentence(err, "--prompt", why)


def test_compare_checks_the_prompt_before_loading(tmp_path):
    missing = str(tmp_path / "no-such")
    for prompt, why in (("", "is empty"), ("\udcff", "is not valid UTF-8")):
        with pytest.raises(NanoMoeError, match=f"--prompt {why}"):
            conversion.compare(missing, missing, prompt=prompt, log=lambda *_: None)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_huge_max_new_tokens_is_refused_by_the_parser(framework, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _sample(framework, ["--checkpoint", str(tmp_path), "--max_new_tokens",
                            "1099511627776"], capsys)
    assert e.value.code == 2
    assert "--max_new_tokens: must be an integer from 0 to 10000000" in capsys.readouterr().err


def test_out_of_memory_while_sampling_is_one_sentence(ckpt, capsys, monkeypatch):
    import nanomoe_jax.sample

    def exhausted(*_, **__):  # what XLA raises for a buffer it cannot allocate
        raise type("JaxRuntimeError", (RuntimeError,), {})(
            "RESOURCE_EXHAUSTED: Out of memory allocating 4398046511112 bytes.")
    monkeypatch.setattr(nanomoe_jax.sample, "_generate", exhausted)
    rc, err = _sample("jax", ["--checkpoint", ckpt, "--prompt", "ab", "--max_new_tokens", "3"],
                      capsys)
    assert rc == 2
    _one_sentence(err, "out of memory while sampling", "--max_new_tokens")


def test_a_tokenizer_json_with_no_vocabulary_is_one_sentence(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from nanomoe.tokenizer import get_tokenizer

    path = str(tmp_path / "empty.json")
    Tokenizer(models.WordLevel({}, unk_token="[UNK]")).save(path)
    with pytest.raises(NanoMoeError, match="empty vocabulary"):
        get_tokenizer(path)
    rc, err = _sample("jax", ["--checkpoint", str(tmp_path / "none"), "--tokenizer", path],
                      capsys)
    assert rc == 2
    _one_sentence(err, "empty vocabulary")
    # a vocabulary without its own unknown token: encoding an unknown word fails in Rust
    Tokenizer(models.WordLevel({"a": 0}, unk_token="[UNK]")).save(path)
    with pytest.raises(NanoMoeError, match="cannot encode the text .*Missing \\[UNK\\]"):
        get_tokenizer(path).encode("b")


# ---------------------------------------------------------------------------------------------
# a disk that fills up while a verb writes

DRIVER = r"""
import sys
from conversion.cli import main
d = sys.argv[1]
rcs = [main(argv) for argv in (
    ["to-torch", d + "/log", "--out", d + "/o.pt"],
    ["to-torch", d + "/log", "--format", "safetensors", "--out", d + "/o_st"],
    ["to-hf", d + "/log", "--out", d + "/o_hf"],
    ["from-torch", d + "/g.pt", "--out", d + "/o_jax"])]
print(rcs)
"""


def test_a_full_disk_while_converting_is_one_sentence_and_leaves_nothing(ckpt, tmp_path):
    """A file-size limit (``ulimit -f``: EFBIG) stands in for a full disk or a quota; each
    writer (torch's zip writer, safetensors, orbax) fails in its own way."""
    shutil.copytree(ckpt, tmp_path / "log")
    conversion.to_torch(str(tmp_path / "log"), str(tmp_path / "g.pt"), log=lambda *_: None)
    before = sorted(os.listdir(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # 16 KiB: under the 32 KiB token embedding, so every writer must fail. At 40 KiB orbax
    # sometimes spread the arrays over data files all under the limit and succeeded.
    r = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", sys.executable,
                        "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2]", r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: could not write ") and
                                   "nothing was written" in line for line in lines), r.stderr
    assert sorted(os.listdir(tmp_path)) == before
