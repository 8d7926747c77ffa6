"""Bad inputs to the conversion and sampling tools: one sentence, exit 2, nothing touched.

--out that overlaps an input or --force on an unrelated path, malformed safetensors and
config.json, FIFOs / devices / folders where a file is expected, NaN weights, bad numeric
flags, and the permissions of what the verbs write."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch

import conversion
import nanomoe_torch
from conversion.init_from import init_arrays
from nanomoe.pt_files import load_checkpoint_file
from conversion.cli import main as conversion_main
from helpers import TINY, fail_if_blocked, random_torch_model
from nanomoe import GPTConfig, config_to_dict
from nanomoe.errors import NanoMoeError

GPT = GPTConfig(**TINY)
QUIET = dict(log=lambda *_: None)


@pytest.fixture
def pt(tmp_path):
    sd = random_torch_model(GPT, seed=1).state_dict()
    path = tmp_path / "in" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": sd, "config": config_to_dict(GPT), "step": 2}, path)
    (tmp_path / "unrelated.txt").write_text("keep me")
    return str(path)


def snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest() if name in files else "dir"
    return out


def refused(argv, capsys, *needles):
    capsys.readouterr()  # drop what earlier calls printed (e.g. a progress bar)
    assert conversion_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------------------------------
# --out and --force


def test_out_that_overlaps_an_input_is_refused_even_with_force(pt, tmp_path, capsys):
    folder = tmp_path / "in"
    conversion.to_torch(pt, str(folder / "st"), "safetensors", **QUIET)
    before = snapshot(tmp_path)
    for argv, where in [
        (["to-torch", pt, "--out", pt], "is the input"),
        (["from-torch", pt, "--out", str(folder)], "contains the input"),
        (["from-torch", pt, "--out", str(tmp_path)], "contains the input"),
        (["to-hf", str(folder / "st"), "--out", str(folder / "st" / "sub")], "lies inside"),
        (["to-torch", str(folder / "st"), "--out", str(folder / "st"), "--format",
          "safetensors"], "is the input"),
    ]:
        for force in ([], ["--force"]):
            refused(argv + force, capsys, where)
    assert snapshot(tmp_path) == before


def test_force_replaces_only_an_earlier_output_of_the_same_verb(pt, tmp_path, capsys):
    unrelated_dir = tmp_path / "mine"
    unrelated_dir.mkdir()
    (unrelated_dir / "notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    unrelated = str(tmp_path / "unrelated.txt")
    refused(["to-torch", pt, "--out", unrelated, "--force"], capsys, "torch.save")
    refused(["to-torch", pt, "--out", str(unrelated_dir), "--force"], capsys, "--force does not")
    refused(["to-torch", pt, "--out", str(unrelated_dir), "--force", "--format", "safetensors"],
            capsys, "config.json and model.safetensors")
    refused(["from-torch", pt, "--out", str(unrelated_dir), "--force"], capsys, "checkpoints/")
    refused(["to-hf", pt, "--out", unrelated, "--force"], capsys, "--force does not")
    assert snapshot(tmp_path) == before
    # an earlier output of the same verb is replaced
    for argv in (["to-torch", pt, "--out", str(tmp_path / "o.pt")],
                 ["to-torch", pt, "--out", str(tmp_path / "st"), "--format", "safetensors"],
                 ["to-hf", pt, "--out", str(tmp_path / "hf")],
                 ["from-torch", pt, "--out", str(tmp_path / "jax")]):
        assert conversion_main(argv) == 0
        assert conversion_main(argv + ["--force"]) == 0
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"


def test_outputs_get_normal_permissions(pt, tmp_path):
    old = os.umask(0o022)
    try:
        conversion.to_torch(pt, str(tmp_path / "o.pt"), **QUIET)
        conversion.to_torch(pt, str(tmp_path / "st"), "safetensors", **QUIET)
        conversion.hf.to_hf(pt, str(tmp_path / "hf"), **QUIET)
        conversion.from_torch(pt, str(tmp_path / "jax"), **QUIET)
    finally:
        os.umask(old)
    for out in ("o.pt", "st", "hf", "jax"):
        for root, dirs, files in os.walk(tmp_path / out):
            assert os.stat(root).st_mode & 0o777 == 0o755, root
            for name in files:
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name
    assert os.stat(tmp_path / "o.pt").st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# malformed safetensors and config.json


def _corrupt(path, how):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    key = next(k for k in header if k != "__metadata__")
    if how == "header_length_lies":
        data = struct.pack("<Q", len(data) * 4) + data[8:]
    elif how == "truncated":
        data = data[: 8 + n + len(body) // 2]
    elif how == "not_json":
        data = struct.pack("<Q", n) + b"{" * n + body
    else:
        if how == "offsets_past_end":
            header[key]["data_offsets"] = [len(body), len(body) + 4096]
        elif how == "wrong_dtype":
            header[key]["dtype"] = "F99"
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + body
    open(path, "wb").write(data)


def _safetensors_loaders(folder):
    return {
        "load_source": lambda: conversion.load_source(folder, **QUIET),
        "init_arrays": lambda: init_arrays(folder),
        "from_pretrained": lambda: nanomoe_torch.GPT.from_pretrained(folder),
        "compare": lambda: conversion.compare(folder, folder, tokens=[1, 2], **QUIET),
    }


@pytest.mark.parametrize("how", ["header_length_lies", "offsets_past_end", "truncated",
                                 "not_json", "wrong_dtype"])
def test_malformed_safetensors_is_one_sentence(pt, tmp_path, how):
    folder = str(tmp_path / "st")
    conversion.to_torch(pt, folder, "safetensors", **QUIET)
    _corrupt(os.path.join(folder, "model.safetensors"), how)
    for name, load in _safetensors_loaders(folder).items():
        with pytest.raises(NanoMoeError, match="not a valid safetensors file") as e:
            load()
        assert "\n" not in str(e.value), name


def test_hf_folder_with_malformed_safetensors(pt, tmp_path, capsys):
    folder = str(tmp_path / "hf")
    conversion.hf.to_hf(pt, folder, **QUIET)
    _corrupt(os.path.join(folder, "model.safetensors"), "offsets_past_end")
    refused(["from-hf", folder, "--out", str(tmp_path / "o")], capsys, "could not load")
    refused(["compare", folder, pt, "--tokens", "1,2"], capsys, "could not load")
    with pytest.raises(NanoMoeError, match="could not load"):
        init_arrays(folder)


@pytest.mark.parametrize("text,why", [("{oops", "is not valid JSON"),
                                      ("[1, 2]", "not an object")])
def test_config_json_that_is_not_a_json_object(pt, tmp_path, capsys, text, why):
    ours, theirs = str(tmp_path / "st"), str(tmp_path / "hf")
    conversion.to_torch(pt, ours, "safetensors", **QUIET)
    conversion.hf.to_hf(pt, theirs, **QUIET)
    for folder in (ours, theirs):
        open(os.path.join(folder, "config.json"), "w").write(text)
        for load in (lambda: conversion.load_source(folder, **QUIET),
                     lambda: init_arrays(folder),
                     lambda: conversion.compare(folder, pt, tokens=[1], **QUIET)):
            with pytest.raises(NanoMoeError, match=why):
                load()
        refused(["from-hf", folder, "--out", str(tmp_path / "o")], capsys, why)
    with pytest.raises(NanoMoeError, match=why):
        nanomoe_torch.GPT.from_pretrained(ours)


def test_local_hf_config_that_transformers_rejects_is_not_blamed_on_the_hub(pt, tmp_path, capsys):
    folder = str(tmp_path / "hf")
    conversion.hf.to_hf(pt, folder, **QUIET)
    open(os.path.join(folder, "config.json"), "w").write('{"model_type": "no-such-model"}')
    err = refused(["from-hf", folder, "--out", str(tmp_path / "o")], capsys,
                  "config.json: transformers could not read it")
    assert "hub" not in err


@pytest.mark.parametrize("text", ["{oops", "[]", '{"step": 1}'])
def test_jax_checkpoint_with_damaged_meta(pt, tmp_path, text):
    out = str(tmp_path / "jax")
    conversion.from_torch(pt, out, **QUIET)
    open(os.path.join(out, "checkpoints", "2", "meta", "metadata"), "w").write(text)
    for load in (lambda: conversion.load_source(out, **QUIET), lambda: init_arrays(out)):
        with pytest.raises(NanoMoeError, match="checkpoints/2: ") as e:
            load()
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# files that are not regular files


@pytest.fixture
def alarm():
    with fail_if_blocked(20):
        yield


def test_fifos_devices_and_folders_are_refused_at_once(tmp_path, alarm):
    from nanomoe.data import open_dataset
    from nanomoe.hellaswag import find_or_download
    from nanomoe.tokenizer import get_tokenizer

    fifo = str(tmp_path / "model.pt")
    os.mkfifo(fifo)
    data_dir = tmp_path / "shards"
    data_dir.mkdir()
    np.save(data_dir / "x_train_000.npy", np.arange(100, dtype=np.uint16))
    os.mkfifo(data_dir / "x_val_000.npy")
    os.mkfifo(tmp_path / "corpus.txt")
    os.mkfifo(tmp_path / "tok.json")
    (tmp_path / "folder.json").mkdir()
    for path in (fifo, "/dev/zero"):
        for load in (load_checkpoint_file, init_arrays,
                     lambda p: conversion.load_source(p, **QUIET)):
            with pytest.raises(NanoMoeError, match="not a regular file"):
                load(path)
    for data in (str(tmp_path / "corpus.txt"), str(data_dir)):
        with pytest.raises(NanoMoeError, match="FIFO, not a regular file"):
            open_dataset(data, split="val")
    with pytest.raises(NanoMoeError, match="FIFO, not a regular file"):
        get_tokenizer(str(tmp_path / "tok.json"))
    with pytest.raises(NanoMoeError, match="is a folder"):
        get_tokenizer(str(tmp_path / "folder.json"))
    for path, why in ((tmp_path / "tok.json", "FIFO"), ("/dev/zero", "device"),
                      (tmp_path / "folder.json", "is a folder")):
        with pytest.raises(NanoMoeError, match=why):
            find_or_download(str(path), tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# NaN weights, numeric flags


def test_nan_weights_are_named_at_load(pt, tmp_path, capsys):
    ckpt = torch.load(pt, weights_only=True)
    ckpt["model"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    bad = str(tmp_path / "nan.pt")
    torch.save(ckpt, bad)
    why = "the weights hold non-finite values (first: transformer.h.0.attn.c_attn.weight)"
    with pytest.raises(NanoMoeError, match=r"non-finite values \(first: transformer\.h\.0"):
        init_arrays(bad)
    refused(["from-torch", bad, "--out", str(tmp_path / "o")], capsys, why)
    refused(["compare", bad, pt, "--tokens", "1,2"], capsys, why)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--tolerance", "-1"], ["--tolerance", "nan"],
                                   ["--tolerance", "inf"], ["--tokens", "a,b"],
                                   ["--tokens", ","], ["--tokens", "-3"]])
def test_compare_refuses_bad_numbers(pt, flags, capsys):
    with pytest.raises(SystemExit) as e:
        conversion_main(["compare", pt, pt, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("usage") is False


@pytest.mark.parametrize("flags", [["--max_new_tokens", "-1"], ["--top_k", "0"],
                                   ["--temperature", "-1"], ["--temperature", "nan"],
                                   ["--num_samples", "0"], ["--max_new_tokens", "x"],
                                   ["--seed", "-2"]])
def test_sampler_refuses_bad_numbers(flags, capsys):
    from nanomoe.sampling_cli import main

    def load(path):
        raise AssertionError("loaded despite a bad flag")

    with pytest.raises(SystemExit) as e:
        main("sample", load, None, ["--checkpoint", "x", *flags])
    assert e.value.code == 2
    assert "error: argument" in capsys.readouterr().err
