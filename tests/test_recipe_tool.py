"""benchmarks.recipe (nanoGPT's quick start reproduced): a tiny run end to end, and the
commands it runs are nanoGPT's recipe. No loss is asserted: the real run is in README."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import recipe, results_dir

ROOT = Path(__file__).resolve().parents[1]


def test_commands_are_nanogpts_recipe():
    cmd = recipe.command("torch-nanogpt", "t.txt", 2000, "LOG")
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--framework"] == "torch" and flags["--beta2"] == "0.99"
    assert flags["--data_order"] == "random" and flags["--eval_steps"] == "all"
    assert (flags["--B"], flags["--T"], flags["--n_layer"], flags["--n_embd"]) == ("12", "64", "4", "128")
    assert (flags["--max_lr"], flags["--min_lr"], flags["--warmup_steps"]) == ("1e-3", "1e-4", "100")
    original = dict(zip(*[iter(recipe.command("jax-original", "t.txt", 10, "L")[2:])] * 2))
    assert original["--beta2"] == "0.95" and original["--data_order"] == "sequential"


def test_tiny_run_writes_table_curves_and_plot(tmp_path, monkeypatch, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400)
    out = tmp_path / "out"
    committed = (ROOT / "benchmarks/results/nanogpt-shakespeare.json").read_bytes()
    # no --out: the results go to the user's folder (here $NANOMOE_RESULTS), not the repository
    monkeypatch.setenv("NANOMOE_RESULTS", str(out))
    rc = recipe.main(["--data", str(text), "--steps", "12", "--runs", "jax-nanogpt",
                      "--log_root", str(tmp_path)])
    assert rc == 0
    assert (ROOT / "benchmarks/results/nanogpt-shakespeare.json").read_bytes() == committed
    assert f"results in {out} (the default folder" in capsys.readouterr().out
    result = json.loads((out / "nanogpt-shakespeare.json").read_text())
    run = result["runs"][0]
    assert run["run"] == "jax-nanogpt" and run["val_curve"][-1][0] == 12
    assert run["val_tokens"] > 0 and run["val_loss"] == run["val_curve"][-1][1]
    assert "| jax-nanogpt |" in (out / "nanogpt-shakespeare.md").read_text()
    assert (out / "nanogpt-shakespeare.png").stat().st_size > 1000


def test_bad_input_is_one_sentence(tmp_path, capsys):
    assert recipe.main(["--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_default_results_folder_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOMOE_RESULTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert results_dir.default_out() == tmp_path / "cache" / "nanomoe" / "results"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert results_dir.default_out() == tmp_path / "home" / ".cache" / "nanomoe" / "results"
    monkeypatch.setenv("NANOMOE_RESULTS", str(tmp_path / "mine"))
    assert results_dir.default_out() == tmp_path / "mine"
