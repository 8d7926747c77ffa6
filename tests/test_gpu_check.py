"""benchmarks.gpu_check, the one command for a GPU machine, run end to end on CPU with
--dry-run (tiny sizes), so it is never broken when a GPU finally comes; plus its two exits
that need no run: every part skipped by the budget, and no GPU without --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check_report import card_slug
from benchmarks.gpu_check_run import parse_train_output

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel: proves the carried-wheels path reaches the parts."""
    folder.mkdir()
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    dist = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe/__init__.py": "VALUE = 1\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def load_report(out: Path) -> tuple[dict, str]:
    [js] = out.glob("gpu-*.json")
    return json.loads(js.read_text()), js.with_suffix(".md").read_text()


def test_dry_run_end_to_end(tmp_path):
    """One run checked from every side (a single test on purpose: the run is the cost)."""
    out = tmp_path / "results"
    proc = run(["--dry-run", "--out", str(out), "--budget_s", "900",
                "--wheels", str(probe_wheel(tmp_path / "wheels"))])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, md = load_report(out)
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert status == {p: "ok" for p in ["env", "numerics", "timing:gpt", "timing:moegpt",
                                        "timing:moderngpt", "timing:moegpt-64", "train"]}
    env = report["env"]
    assert env["distributions"]["jax"] and env["distributions"]["torch"]
    assert env["visible"]["torch_cuda"] in (True, False)
    assert report["wheels"]["status"] == "installed"
    assert env["carried"] == {"gpu-check-probe": "0.1"}

    checks = {c["check"]: c for c in report["numerics"]["checks"]}
    for name in ("step GPTConfig", "step ModernGPTConfig", "step MoeGPTConfig",
                 "step nGPTConfig", "moe dispatch grouped vs dense",
                 "moe dispatch capacity vs dense"):
        assert checks[name]["ok"], checks[name]
    assert checks["step MoeGPTConfig"]["grad_norm_torch_fp32"] > 0
    [attention] = [c for c in checks.values() if c["check"].startswith("attention ")]
    assert attention["ok"] and attention["logits_rel"] > 0  # two kernels, not one twice
    # back ends still being built elsewhere (ragged under the train step, tokamax) must be
    # reported, passing or not: a row each whenever the config accepts them
    from benchmarks.gpu_check_numerics import moe_dispatches

    for d in moe_dispatches():
        assert f"moe dispatch {d} vs dense" in checks

    for model in gpu_check.MODELS:
        part = report["timing"][model]
        rows = {r["framework"]: r for r in part["rows"]}
        # gpt also times the layer scan against the unrolled default
        assert set(rows) == {"jax", "torch"} | (
            {"jax (scan_layers=True)"} if model == "gpt" else set()), part
        if model == "gpt":
            assert "scan_layers=True" in rows["jax (scan_layers=True)"]["jax_execution"]
            assert "scan_layers=False" in rows["jax"]["jax_execution"]
        for r in rows.values():
            assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["timed_steps"] == 2, r
        cal = part["calibration"]
        assert cal["planned_peak_bytes"] > 0 and cal["est_step_s"] > 0
        assert cal["measured_step_s"] == rows["jax"]["step_s"]
        assert "nominal" in cal["card_figures"]["source"]  # CPU: no card figures pretended
    train = report["train"]
    assert train["steps_logged"] >= 1 and train["tokens_per_s_median"] > 0, train
    assert "tok/s" in train["last_line"]

    # the tables are printed last, and the markdown holds them too
    assert proc.stdout.rstrip().splitlines()[-1].startswith("wrote ")
    assert "## Planned vs measured (JAX)" in proc.stdout.split("[7/7] train")[-1]
    for heading in ("## Parts", "## Numerics (before timing)", "| gpt | jax |", "## Targets"):
        assert heading in md
    # the script's own code uses no API its jax/flax/torch deprecate
    ours = [w for w in report["deprecations"] if "gpu_check" in w]
    assert not ours, ours


def test_budget_skips_what_does_not_fit(tmp_path):
    proc = run(["--dry-run", "--out", str(tmp_path), "--budget_s", "1"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report, md = load_report(tmp_path)
    assert [p["status"] for p in report["parts"]] == ["skipped"] * 7
    assert "(--budget_s)" in report["parts"][0]["reason"]
    assert "skipped (budget)" in md


def test_no_gpu_stops_with_one_sentence(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = run(["--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    [sentence] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "no GPU visible to jax and torch" in sentence and "--dry-run" in sentence
    assert not list(tmp_path.glob("gpu-*"))  # nothing timed, nothing written


def test_card_names_and_train_lines():
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert card_slug("NVIDIA GH200 480GB") == "gh200"
    assert card_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert card_slug("cpu") == "cpu"
    lines = ["jax on gpu (...)",
             "step     0/6 | loss 10.9 | lr 1e-05 | norm 2.0 | compiling: 31.5 s",
             "step     1/6 | loss 10.8 | lr 2e-05 | norm 2.1 | 640 ms | 409,600 tok/s | eta 0:03",
             "step     2/6 | loss 10.7 | lr 3e-05 | norm 2.2 | 655 ms | 400,000 tok/s | mfu 40.1% "
             "| eta 0:02"]
    out = parse_train_output(lines, "ok")
    assert out["steps_logged"] == 2 and out["first_step_compile_s"] == 31.5
    assert out["step_ms"] == [640.0, 655.0] and out["last_line"].startswith("step     2/6")
    assert "error" in parse_train_output(lines[:2], "timeout")


def test_part_cut_short_keeps_what_it_sent():
    """A part past its limit is killed (its whole process group) and the rows it sent before
    stay: the timings of a model whose calibration did not finish are still reported."""
    from benchmarks.gpu_check_report import render_tables
    from benchmarks.gpu_check_run import PARTIAL_TAG, run_child

    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print(%r + '{\"rows\": [1]}', flush=True); "
            "time.sleep(60)" % PARTIAL_TAG)
    out = run_child([sys.executable, "-c", code], 5, dict(os.environ), ROOT)
    assert out["status"] == "timeout" and out["seconds"] < 30
    assert out["partials"] == [{"rows": [1]}] and out["result"] is None
    row = dict(framework="jax", step_s=0.1, step_p10_s=0.09, step_p90_s=0.11,
               tokens_per_s=163840.0, peak_mem_bytes=2 ** 31)
    report = {"meta": {"sizes": {"B": 16, "T": 1024}}, "env": {"device": "NVIDIA H100"},
              "timing": {"gpt": {"rows": [row], "error": "timeout after 240 s"}}}
    table = render_tables(report)
    assert "| gpt | jax | 100.0 | 90.0 | 110.0 | 163,840 |" in table
    assert "| gpt | after timing: timeout after 240 s |" in table
