"""The CPU quick start (issue 15): the benchmark's CPU presets and interleaved rounds, the CPU
execution options, and the default sample prompt. No timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import pytest

from benchmarks import bench, configs
from nanomoe.cli import CPU_PRESET, DEFAULT_CORPUS_PROMPT, ORIGINAL_PROMPT, parse_args
from nanomoe.config import GPTConfig, MoeGPTConfig
from nanomoe_jax.execution import UNROLL_MAX_LAYERS, execution_options

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


class FakeDevice:
    def __init__(self, platform, kind, cc=None):
        self.platform, self.device_kind, self.compute_capability = platform, kind, cc


def test_cpu_presets_are_what_users_run():
    nano = configs.PRESETS["cpu-nanogpt"]  # nanoGPT's train_shakespeare_char CPU command
    assert (nano.B, nano.T, nano.models) == (12, 64, ("gpt",))
    assert nano.shape == dict(n_layer=4, n_embd=128, n_head=4, block_size=64, vocab_size=256)
    default = configs.PRESETS["cpu-default"]  # train.py with no size flag on a CPU
    assert (default.B, default.T, default.models) == (CPU_PRESET["B"], CPU_PRESET["T"], ("moegpt",))
    for key in ("n_layer", "n_embd", "n_head", "block_size"):
        assert default.shape[key] == CPU_PRESET[key], key
    assert default.shape["vocab_size"] == 256  # the default corpus is byte-tokenised
    cfgs = configs.model_configs(nano)
    assert isinstance(cfgs["gpt"], GPTConfig) and cfgs["gpt"].vocab_size == 256
    assert isinstance(configs.model_configs(default)["moegpt"], MoeGPTConfig)
    assert nano.rounds > 1 and default.rounds > 1 and not nano.experts


def test_interleaved_rounds_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    before = sorted((ROOT / "benchmarks" / "results").glob("cpu-*"))
    # no --out: written to the user's folder (here $NANOMOE_RESULTS), never the repository's
    monkeypatch.setenv("NANOMOE_RESULTS", str(out))
    rep = bench.main(["--preset", "cpu-nanogpt", "--frameworks", "jax,torch", "--rounds", "3",
                      "--steps", "2", "--warmup", "1", "--set", "n_layer=1", "--fast-compile"])
    assert sorted((ROOT / "benchmarks" / "results").glob("cpu-*")) == before
    assert f"results in {out} (the default folder" in capsys.readouterr().out
    rows = {r["framework"]: r for r in rep["results"]}
    assert set(rows) == {"jax", "torch"} and not [r for r in rows.values() if r.get("error")]
    for r in rows.values():
        assert (r["rounds"], r["timed_steps"], len(r["round_medians_s"])) == (3, 6, 3)
        assert (r["B"], r["T"]) == (12, 64)
        assert r["step_min_s"] <= r["step_p10_s"] <= r["step_s"] <= r["step_p90_s"]
        assert len(r["step_s_all"]) == 6 and r["loss"] > 0
    assert "scan_layers=False" in rows["jax"]["jax_execution"]  # what train.py picks on CPU
    data = json.loads((out / Path(rep["paths"]["json"]).name).read_text())
    assert data["meta"]["rounds"] == 3 and "--preset cpu-nanogpt" in data["meta"]["command"]
    md = (out / Path(rep["paths"]["md"]).name).read_text()
    assert "## Interleaved rounds" in md
    line = next(x for x in md.splitlines() if x.startswith("| gpt | 12 x 64 | jax |"))
    ratio, ratio10 = line.strip("| ").split(" | ")[-2:]
    t, j = rows["torch"], rows["jax"]
    assert float(ratio) == pytest.approx(t["step_s"] / j["step_s"], abs=0.006)
    assert float(ratio10) == pytest.approx(t["step_p10_s"] / j["step_p10_s"], abs=0.006)


def test_rounds_cannot_be_isolated():
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "cpu-nanogpt", "--rounds", "2", "--isolate"])


def test_one_device_unrolls_the_layer_stack_and_a_gpu_mesh_scans_it():
    cpu, h100 = FakeDevice("cpu", "cpu"), FakeDevice("gpu", "NVIDIA H100", "9.0")
    small = GPTConfig(n_layer=UNROLL_MAX_LAYERS, n_embd=128, n_head=4)
    deep = GPTConfig(n_layer=UNROLL_MAX_LAYERS + 1, n_embd=64, n_head=4)
    for device in (cpu, h100):
        assert execution_options(device, small).scan_layers is False
        assert execution_options(device, deep).scan_layers is True  # compile time grows
        assert execution_options(device, small, scan_layers=True).scan_layers is True  # a flag
    assert execution_options(h100, small, mesh_devices=8).scan_layers is True  # peaks (NOTES)
    assert execution_options(cpu, small, mesh_devices=8).scan_layers is False


def test_default_prompt_fits_the_data():
    assert DEFAULT_CORPUS_PROMPT == "ROMEO:\n" and ORIGINAL_PROMPT == "Hello, I'm a language model,"
    assert parse_args([]).sample_prompt == DEFAULT_CORPUS_PROMPT  # Shakespeare's plays
    assert parse_args(["--data", "some.txt"]).sample_prompt == ORIGINAL_PROMPT
    assert parse_args(["--sample_prompt", "JULIET:"]).sample_prompt == "JULIET:"
    assert parse_args(["--data", "x.txt", "--sample_prompt", "import "]).sample_prompt == "import "


def test_max_steps_alone_keeps_the_cpu_preset():
    """A shorter first run must not switch to the original's 8x512 model at 262k tokens."""
    from nanomoe.cli import apply_cpu_preset

    argv = ["--max_steps", "20"]
    args = parse_args(argv)
    assert apply_cpu_preset(args, argv)
    assert (args.max_steps, args.n_layer, args.B, args.T) == (20, CPU_PRESET["n_layer"],
                                                              CPU_PRESET["B"], CPU_PRESET["T"])
    argv = ["--n_layer", "2"]
    assert not apply_cpu_preset(parse_args(argv), argv)  # a size flag: the user's sizes


def test_compile_cache_folder(tmp_path, monkeypatch):
    """train.py keeps compiled programs in --compile_cache (off disables it; the environment's
    JAX_COMPILATION_CACHE_DIR, which this test session sets, wins)."""
    from nanomoe_jax import compile_cache

    assert compile_cache.enable(str(tmp_path / "c")) == os.environ["JAX_COMPILATION_CACHE_DIR"]
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    before = jax.config.jax_compilation_cache_dir
    try:
        assert compile_cache.enable("off") is None
        assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        blocked = tmp_path / "file"
        blocked.write_text("not a folder")
        assert compile_cache.enable(str(blocked / "c")) is None  # no cache, no failure
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
