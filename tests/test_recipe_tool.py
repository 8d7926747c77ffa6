"""benchmarks.recipe (nanoGPT's quick start reproduced): a tiny run end to end, and the
commands it runs are nanoGPT's recipe. No loss is asserted: the real run is in README."""

from __future__ import annotations

import json

from benchmarks import recipe


def test_commands_are_nanogpts_recipe():
    cmd = recipe.command("torch-nanogpt", "t.txt", 2000, "LOG")
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--framework"] == "torch" and flags["--beta2"] == "0.99"
    assert flags["--data_order"] == "random" and flags["--eval_steps"] == "all"
    assert (flags["--B"], flags["--T"], flags["--n_layer"], flags["--n_embd"]) == ("12", "64", "4", "128")
    assert (flags["--max_lr"], flags["--min_lr"], flags["--warmup_steps"]) == ("1e-3", "1e-4", "100")
    original = dict(zip(*[iter(recipe.command("jax-original", "t.txt", 10, "L")[2:])] * 2))
    assert original["--beta2"] == "0.95" and original["--data_order"] == "sequential"


def test_tiny_run_writes_table_curves_and_plot(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400)
    out = tmp_path / "out"
    rc = recipe.main(["--data", str(text), "--steps", "12", "--runs", "jax-nanogpt",
                      "--log_root", str(tmp_path), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "nanogpt-shakespeare.json").read_text())
    run = result["runs"][0]
    assert run["run"] == "jax-nanogpt" and run["val_curve"][-1][0] == 12
    assert run["val_tokens"] > 0 and run["val_loss"] == run["val_curve"][-1][1]
    assert "| jax-nanogpt |" in (out / "nanogpt-shakespeare.md").read_text()
    assert (out / "nanogpt-shakespeare.png").stat().st_size > 1000


def test_bad_input_is_one_sentence(tmp_path, capsys):
    assert recipe.main(["--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
