"""Smoke test of the benchmark (python -m benchmarks.bench) at the tiniest size, on CPU.

It checks that one run writes the JSON, markdown and plot, that the tables hold the rows and
columns they should, and that the compiled-HLO check sees what the MoE back ends promise:
capacity dispatch FLOPs do not grow with the expert count, dense dispatch FLOPs do. No timing
is asserted (CPU times mean nothing here, and the machine may be busy).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench, configs, moe_sweep
from benchmarks.hlo_text import hlo_shapes

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def test_benchmark_smoke(tmp_path):
    """One small run checked from every side. A single test on purpose: under pytest-xdist a
    module fixture would run once per worker, and the run is the expensive part."""
    out = tmp_path / "results"
    # --fast-compile: XLA without LLVM optimisation, so the 8 compilations stay quick (the HLO
    # check and the cost table share theirs).
    rep = bench.main(["--preset", "tiny", "--models", "moegpt", "--frameworks", "jax,torch",
                      "--experts", "4,8", "--backends", "capacity", "--steps", "1",
                      "--warmup", "1", "--B", "1", "--T", "32", "--set", "n_layer=1",
                      "--fast-compile",
                      "--hlo", "--hlo-dispatches", "capacity,dense", "--hlo-experts", "13,52",
                      "--cost-experts", "13,52", "--cost-dispatches", "capacity,dense",
                      "--out", str(out)])
    report = rep, out
    check_files(report)
    check_cells(report)
    check_markdown(report)
    check_hlo(report)
    check_cost_analysis(report)
    check_merge(report, tmp_path / "merged")


def check_files(report):
    rep, out = report
    paths = {k: out / Path(v).name for k, v in rep["paths"].items()}
    assert set(paths) == {"json", "md", "png"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    data = json.loads(paths["json"].read_text())
    env = data["meta"]["env"]
    for key in ("jax", "jaxlib", "flax", "torch", "device"):
        assert env[key]
    assert data["meta"]["command"].startswith("python -m benchmarks.bench --preset tiny")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def check_cells(report):
    rep, _ = report
    rows = rep["results"]
    assert not [r for r in rows if r.get("error")]
    # 1 model x 2 frameworks, 2 sweep points x (jax capacity, torch), one ceiling x the same
    assert len(rows) == 2 + 2 * 2 + 2
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert r["peak_mem_bytes"] > 0 and r["peak_mem_source"]
        assert r["mfu_measured"] is not None and r["mfu_datasheet"] is None  # CPU: no datasheet
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    assert all(r["compile_s"] > 0 and "xla_mem_bytes" in r for r in jax_rows)
    sweep = [r for r in rows if r["section"] == "sweep"]
    # fixed active compute: same k and H at every E; the active parameters differ only by the
    # router's (C + 1) x E per layer, the total parameters by the experts too
    assert {(r["k"], r["H"]) for r in sweep} == {(2, 128)}
    by_e = {r["E"]: r for r in sweep}
    C, L = 64, 1
    assert by_e[8]["params_active"] - by_e[4]["params_active"] == L * (C + 1) * 4
    expert = 2 * 128 * C + 128 + C  # fc and proj weights and biases
    assert by_e[8]["params_total"] - by_e[4]["params_total"] == L * 4 * (expert + C + 1)
    ceiling = [r for r in rows if r["section"] == "ceiling"]
    assert {r["E"] for r in ceiling} == {sweep[0]["k"]}


def check_markdown(report):
    rep, out = report
    md = (out / Path(rep["paths"]["md"]).name).read_text()
    assert "| model | framework | tokens/s | step ms | MFU (measured peak) |" in md
    assert "| model | jax | torch | torch-compile | JAX/torch | JAX/torch-compile |" in md
    assert "| moegpt | jax (capacity) |" in md and "| moegpt | torch |" in md
    lines = md.splitlines()
    sweep_rows = [ln for ln in lines if ln.startswith(("| 4 | 2 |", "| 8 | 2 |"))]
    assert len(sweep_rows) == 4  # two E, two frameworks
    assert any(ln.startswith("| ceiling (E=2) |") for ln in lines)
    assert "| E | torch | jax (capacity) | jax (capacity)/torch |" in md
    assert "## HLO check" in md and "## XLA cost analysis" in md


def check_hlo(report):
    rep, _ = report
    capacity, dense = rep["hlo"]
    assert capacity["dispatch"] == "capacity" and capacity["experts"] == [13, 52]
    assert capacity["collisions"] == [] and dense["collisions"] == []
    assert capacity["grows_with_E"] == [] and capacity["unmatched"] == []
    # what does grow is the expert weights and their gradients / optimizer moments
    assert any(r["symbolic"][-2:] in (["64", "128"], ["128", "64"])
               for r in capacity["expected_growth"])
    # and the checker does see the dense dispatch's (E, N, H) hidden activations
    N, H = 2 * 64, 128  # the HLO check's tiny model: B=2, T=64
    assert any(sorted(map(str, r["symbolic"])) == sorted(["E", str(N), str(H)])
               for r in dense["grows_with_E"])


def check_cost_analysis(report):
    rep, _ = report
    flops = {(r["dispatch"], r["E"]): r["xla_flops"] for r in rep["cost"]}
    assert flops[("capacity", 52)] < 1.5 * flops[("capacity", 13)]
    assert flops[("dense", 52)] > 2.5 * flops[("dense", 13)]  # 53 vs 14 experts on every token
    # at the same E, the sparse dispatch is the cheaper one
    assert flops[("capacity", 52)] < flops[("dense", 52)]


def check_merge(report, tmp_path):
    rep, out = report
    path = str(out / Path(rep["paths"]["json"]).name)
    merged = bench.main(["--merge", path, path, "--out", str(tmp_path)])
    assert len(merged["results"]) == 2 * len(rep["results"])
    assert len(merged["meta"]["commands"]) == 2
    assert Path(merged["paths"]["md"]).read_text().count("| moegpt | torch |") == 2


def test_sweep_points_hold_the_active_compute():
    base = configs.model_configs(configs.PRESETS["tiny"])["moegpt"]  # k=2, H=128
    for E in (4, 16, 64):
        p = moe_sweep.sweep_point(base, E, "fixed", 4)
        assert (p.n_routed_experts, p.n_shared, p.n_activated_experts, p.expert_hidden) == (
            E, 1, 2, 128)
        fine = moe_sweep.sweep_point(base, E, "fine", 4)
        assert fine.n_activated_experts * fine.expert_hidden == 2 * 128
        ceiling = moe_sweep.ceiling_point(fine)
        assert ceiling.n_routed_experts == ceiling.n_activated_experts == fine.n_activated_experts
        assert ceiling.expert_hidden == fine.expert_hidden
    with pytest.raises(ValueError):
        moe_sweep.sweep_point(base, 6, "fine", 4)  # k = 3, H = 85.3


def test_hlo_shape_parser():
    hlo_text = """
ENTRY %main (p0: f32[4,8]) -> (f32[4,8], s32[]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %d = bf16[2,4,8]{2,1,0} dot(%a, %b), lhs_contracting_dims={1}
  ROOT %t = (f32[4,8]{1,0}, s32[]) tuple(%p0, %c)
}"""
    shapes = hlo_shapes(hlo_text)
    assert shapes[("f32", (4, 8))] == 2 and shapes[("bf16", (2, 4, 8))] == 1
    assert shapes[("s32", ())] == 1


def test_pipelined_steps_keep_one_step_in_flight():
    """As train.py runs: step i is dispatched before step i-1 is waited for, every step is
    waited for exactly once, and one time is returned per timed step."""
    from benchmarks.env import pipelined_steps

    log = []

    def step():
        log.append(("dispatch", sum(e[0] == "dispatch" for e in log)))
        return log[-1][1]

    times = pipelined_steps(step, lambda i: log.append(("wait", i)), 3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert log == [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2), ("wait", 1),
                   ("dispatch", 3), ("wait", 2), ("wait", 3)]
