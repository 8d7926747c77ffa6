"""Issue 21, training side, the checks themselves (no training): config fields with the sizes
the model can build, flags taken together, files of a run folder, data fingerprints, the
address-space limit. Each is a class of input; the cases are the review's values and others."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from nanomoe import config_checks, data_fingerprint, flag_checks, run_files
from nanomoe.cli import build_config, parse_args
from nanomoe.errors import ConfigError, DataError
from nanomoe.failures import nonfinite_message, nonfinite_weights_message
from nanomoe.init import count_params
from nanomoe.prompts import PromptError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32"]


def config_of(*flags, model="moegpt"):
    return build_config(parse_args(["--model", model, *SMALL, *flags]), 256)


@pytest.mark.parametrize("model, flags, named", [
    ("moegpt", ["--capacity_factor", "1e308"], "--capacity_factor"),
    ("moderngpt", ["--rope_scaling", "1e-300"], "--rope_scaling"),
    ("moderngpt", ["--rope_scaling", "0.5"], "--rope_scaling"),
    ("moegpt", ["--rope_scaling", "1e300"], "--rope_scaling"),
    ("moegpt", ["--route_scale", "1e300"], "--route_scale"),
    ("moegpt", ["--moe_loss_weight", "1e200"], "--moe_loss_weight"),
    ("ngpt", ["--base_scale", "5"], "--base_scale"),
    ("gpt", ["--n_layer", "2147483648"], "--n_layer"),
    ("moderngpt", ["--block_size", "1099511627776"], "--block_size"),
    ("moegpt", ["--n_experts", "99999999999"], "--n_experts"),
])
def test_config_fields_out_of_range_name_the_flag(model, flags, named):
    with pytest.raises(ConfigError, match=named + " must be"):
        config_of(*flags, model=model)


@pytest.mark.parametrize("model", ["gpt", "moderngpt", "moegpt", "ngpt"])
def test_param_count_without_listing_layers_is_exact(model):
    config = config_of("--n_layer", "3", model=model)
    assert config_checks.param_count(config) == count_params(config)


def test_a_model_too_large_is_refused_at_once_not_hung():
    # n_layer 2**31 - 1 passes the integer bound; listing its layers would never end
    config = config_of("--n_layer", str(2**31 - 1), model="gpt")
    args = parse_args(["--B", "1", "--T", "16"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match="GiB.*smaller model"):
        config_checks.check_memory(config, args, 64 * 2**30, "on this host")
    assert time.monotonic() - start < 5
    # activations count too: a small model at a huge batch does not fit either
    big_batch = parse_args(["--B", str(2**30), "--T", "32"])
    with pytest.raises(ConfigError, match="activations the most.*smaller --B or --T"):
        config_checks.check_memory(config_of(), big_batch, 64 * 2**30, "on this host")
    many_tokens = parse_args(["--B", "1", "--T", "16", "--total_batch_size", str(2**40)])
    with pytest.raises(ConfigError, match="batch the most.*smaller --total_batch_size"):
        config_checks.check_memory(config_of(), many_tokens, 64 * 2**30, "on this host")
    config_checks.check_memory(config_of(), parse_args([]), 64 * 2**30, "on this host")


def test_an_address_space_limit_lowers_the_memory_available(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda what: (2**30, resource.RLIM_INFINITY))
    free, where = config_checks.host_memory()
    assert free is not None and free <= 2**30 and "ulimit -v" in where


def flags(*argv):
    args = parse_args(list(argv))
    return args


@pytest.mark.parametrize("argv, words", [
    (["--log_dir", ""], "--log_dir is empty"),
    (["--data", " "], "--data is empty"),
    (["--init_from", ""], "--init_from is empty"),
    (["--sample_prompt", ""], "--sample_prompt is empty"),
    (["--sample_prompt", "ab\udcff"], "--sample_prompt is not valid UTF-8"),
    (["--sample_tokens", "1099511627776"], "--sample_tokens must be at most"),
    (["--max_lr", "1e308"], "beyond float32"),
    (["--max_lr", "1e30", "--embedding_lr_mult", "1e10"], "beyond float32"),
    (["--resume", "--init_from", "x.pt"], "would be ignored"),
])
def test_flags_that_cannot_work_together(argv, words):
    with pytest.raises((ConfigError, PromptError), match=words):
        flag_checks.check_flags(flags(*argv))


def fake_run(log):
    (log / "checkpoints" / "6").mkdir(parents=True)
    (log / "run.json").write_text("{}")
    (log / "notes").mkdir()


@pytest.mark.parametrize("inside", [".", "checkpoints", "checkpoints/6", "run.json"])
def test_init_from_inside_the_run_that_overwrite_deletes(tmp_path, inside):
    log = tmp_path / "log"
    fake_run(log)
    args = flags("--log_dir", str(log), "--overwrite", "--init_from", str(log / inside))
    with pytest.raises(ConfigError, match=r"--overwrite would delete \("):
        flag_checks.check_init_from_survives(args)
    # a file the overwrite keeps, or one elsewhere, is fine; so is --init_from without it
    for ok in (log / "notes", tmp_path):
        flag_checks.check_init_from_survives(flags("--log_dir", str(log), "--overwrite",
                                                   "--init_from", str(ok)))
    flag_checks.check_init_from_survives(flags("--log_dir", str(log), "--init_from", str(log)))


def test_special_files_are_found_through_symlinked_folders_without_looping(tmp_path):
    real = tmp_path / "elsewhere"
    (real / "6").mkdir(parents=True)
    os.mkfifo(real / "6" / "meta")
    (real / "6" / "loop").symlink_to(real)  # a link to an ancestor must not walk forever
    log = tmp_path / "log"
    log.mkdir()
    (log / "checkpoints").symlink_to(real)
    assert list(run_files.special_files(str(log / "checkpoints"))) == \
        [str(log / "checkpoints" / "6" / "meta")]


@pytest.mark.parametrize("meta, words", [
    ({"step": -3, "data": {}}, "step must be 6"),
    ({"step": "6", "data": {}}, 'got "6"'),
    ({"step": True, "data": {}}, "step must be 6"),
    ({"step": 6}, "data position must be a mapping"),
    ({"step": 6, "data": [0, 1]}, "data position must be a mapping"),
    ([6], "not a mapping"),
])
def test_checkpoint_metadata_is_checked_like_a_flag(meta, words):
    with pytest.raises(run_files.RunFileError, match=words):
        run_files.check_meta(meta, "ckpt 6", 6, 10)
    assert run_files.check_meta({"step": 6, "data": {}}, "ckpt 6", 6, 10)["step"] == 6


@pytest.mark.parametrize("content, words", [
    ({"config": [1, 2]}, "config must be a JSON object"),
    ({"flags": "max_lr"}, "flags must be a JSON object"),
    ({"framework": 3}, "framework must be a string"),
    ({"data_files": [1]}, "data_files must be a JSON object"),
])
def test_run_json_fields_are_typed(content, words):
    with pytest.raises(run_files.RunFileError, match=words):
        run_files.check_run_json("run.json", content)
    run_files.check_run_json("run.json", {"config": {}, "flags": {}, "data_files": None})


@pytest.mark.parametrize("line, words", [
    ('{"step": null, "loss": 1.0}', "line 2: step must be a whole number"),
    ('{"step": -1, "loss": 1.0}', "line 2: step"),
    ('{"step": "3", "loss": 1.0}', "line 2: step"),
    ('{"step": 3, "loss": "low"}', "line 2: loss must be a number"),
])
def test_metrics_lines_are_typed(tmp_path, line, words):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(run_files.RunFileError, match=words):
        run_files.check_metrics(str(path))
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo')  # a torn last line is fine
    run_files.check_metrics(str(path))


def test_data_changed_in_place_is_refused_and_a_touch_is_noted(tmp_path):
    data = tmp_path / "book.txt"
    data.write_bytes(b"a" * 200_000)
    before = data_fingerprint.fingerprints(str(data))
    assert data_fingerprint.compare(before, data_fingerprint.fingerprints(str(data)), "log") \
        is None
    os.utime(data, ns=(1, 1))
    assert "modification time" in data_fingerprint.compare(
        before, data_fingerprint.fingerprints(str(data)), "log")
    with open(data, "r+b") as f:  # same size, other last bytes
        f.seek(199_000)
        f.write(b"b")
    with pytest.raises(DataError, match="changed since"):
        data_fingerprint.compare(before, data_fingerprint.fingerprints(str(data)), "log")
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train_0.npy").write_bytes(b"x")
    before = data_fingerprint.fingerprints(str(folder))
    (folder / "train_1.npy").write_bytes(b"y")
    with pytest.raises(DataError, match="new .*train_1.npy"):
        data_fingerprint.compare(before, data_fingerprint.fingerprints(str(folder)), "log")


def test_torch_checkpoints_in_a_folder_whose_name_looks_like_a_pattern(tmp_path):
    from nanomoe_train.torch_backend import TorchBackend

    log = tmp_path / "run[1]"
    log.mkdir()
    (log / "model_000002.pt").write_bytes(b"")
    (tmp_path / "run1").mkdir()  # what the pattern would have matched instead
    (tmp_path / "run1" / "model_000009.pt").write_bytes(b"")
    assert TorchBackend.latest_checkpoint(TorchBackend.__new__(TorchBackend), str(log)) == 2


def test_hellaswag_lone_surrogate_is_refused_before_training(tmp_path):
    from nanomoe import hellaswag
    from nanomoe.tokenizer import ByteTokenizer

    good = {"ctx": "A man", "endings": [" a", " b", " c", " d"], "label": 0}
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "ctx": "x\ud800"}) + "\n")
    with pytest.raises(hellaswag.HellaSwagError, match="line 2 holds a lone surrogate"):
        hellaswag.check_file(path, ByteTokenizer(), 64)
    path.write_bytes(json.dumps(good).encode() + b"\n\xff\xfe\n")
    with pytest.raises(hellaswag.HellaSwagError, match="bytes that are not UTF-8"):
        hellaswag.check_file(path, ByteTokenizer(), 64)


def test_a_nonfinite_step_blames_what_was_not_finite():
    finite = nonfinite_message(1, {"loss": 5.5, "grad_norm": 1.2}, 1e30, None)
    assert "update at learning rate 1e+30 is not" in finite and "--resume" not in finite
    assert "no checkpoint was written yet" in finite
    nan = nonfinite_message(7, {"loss": float("nan"), "grad_norm": 1.0}, 1e-3, "step 6 in log")
    assert "the loss is nan" in nan and "step 6 in log: continue from it with --resume" in nan
    applied = nonfinite_weights_message(9, 3e38, "step 6 in log")
    assert "step 9: the update at learning rate 3e+38 made the weights non-finite" in applied
    assert "last good checkpoint, step 6 in log, with --resume" in applied
    assert "no checkpoint was written yet" in nonfinite_weights_message(2, 1.0, None)


def test_advice_to_overwrite_names_what_it_deletes(tmp_path):
    from nanomoe import run_dir
    from nanomoe.train_setup import no_checkpoint

    log = tmp_path / "log"
    log.mkdir()
    (log / "run.json").write_text("{}")
    (log / "metrics.jsonl").write_text("")
    assert "--overwrite (which deletes metrics.jsonl, run.json)" in no_checkpoint(str(log))
    (log / "model_000003.pt").write_bytes(b"")  # a checkpoint this framework did not see
    assert "--overwrite" not in no_checkpoint(str(log))
    assert "deletes metrics.jsonl, model_000003.pt" in run_dir.overwrite_advice(str(log))


def test_a_low_address_space_limit_is_one_sentence(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2_000_000 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--log_dir",
                           str(tmp_path / "log")], preexec_fn=limit, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: the address-space limit (ulimit -v) is 1.9 GiB")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "log").exists()


def test_eval_steps_beyond_the_val_split_is_refused_when_given():
    import types

    import numpy as np

    from nanomoe.errors import TrainError
    from nanomoe.loader import DataLoader
    from nanomoe.train_setup import check_eval_steps

    val = DataLoader([np.zeros(100, np.uint16)], B=2, T=8)  # 6 windows of 16 tokens
    for steps, given in (("all", True), (6, True), (10**12, False)):
        check_eval_steps(types.SimpleNamespace(eval_steps=steps, eval_steps_given=given), val)
    with pytest.raises(TrainError, match="--eval_steps 1000000000000 is more than the 6"):
        check_eval_steps(types.SimpleNamespace(eval_steps=10**12, eval_steps_given=True), val)


def test_write_advice_does_not_blame_the_disk_for_a_path_in_the_way():
    import errno

    from nanomoe.atomic import write_advice

    for code in (errno.EISDIR, errno.ENOTDIR, errno.ENOENT):
        assert "disk space" not in write_advice(OSError(code, os.strerror(code)))
    assert "disk space" in write_advice(OSError(errno.ENOSPC, "full"))


@pytest.mark.parametrize("prompt, vocab, words", [("\u0000", 256, None),
                                                   ("é", 128, "beyond the model's vocab_size")])
def test_sample_prompt_is_checked_against_the_tokenizer(prompt, vocab, words):
    import types

    from nanomoe.errors import TrainError
    from nanomoe.tokenizer import ByteTokenizer
    from nanomoe.train_setup import check_sample_prompt

    args = types.SimpleNamespace(sample_prompt=prompt)
    config = types.SimpleNamespace(vocab_size=vocab)
    if words is None:
        check_sample_prompt(args, ByteTokenizer(), config)
    else:
        with pytest.raises(TrainError, match=words):
            check_sample_prompt(args, ByteTokenizer(), config)
