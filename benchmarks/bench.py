"""Training-throughput benchmark: JAX vs PyTorch on one device, and an MoE sweep.

    python -m benchmarks.bench                       # tiny sizes on CPU, the original's on a GPU
    python -m benchmarks.bench --preset original --models moegpt --experts none
    python -m benchmarks.bench --hlo --models none --experts none   # the FLOPs/HLO check only
    python -m benchmarks.bench --merge a.json b.json                 # one report from pieces
    python -m benchmarks.bench --preset cpu-nanogpt    # what a CPU user runs (also cpu-default):
                                                       # cells interleaved over 8 rounds

What one *cell* measures (one model x one framework, in this process, on device 0):

* ``jax``: ``nanomoe_jax.train.train_step`` (forward, backward, clip, AdamW, the finiteness
  guard) jitted with the state donated, compute in ``--dtype`` (bf16 on a GPU), params fp32.
* ``torch`` / ``torch-compile``: the original's step (autocast bf16, backward, clip, AdamW;
  fused AdamW on CUDA), the model eager or wrapped in ``torch.compile`` as the original does.

Batches are random tokens already on the device, so host input is not measured. Steps run as
train.py runs them: each is dispatched before the previous step's result is waited for (one
step in flight; JAX and torch on CUDA overlap the host's dispatch with the device's work,
torch on CPU runs in place); tokens/s is B*T over the median of the timed steps.
MFU uses ``nanomoe.flops.flops_per_token`` (6 N_active + 12 L C T) against two peaks: a square
matmul in the compute dtype measured in the same run (8192^3 bf16 on a GPU), and the bf16
datasheet value where the device is known (``nanomoe.flops.PEAK_BF16``). Peak memory: JAX's
``peak_bytes_in_use`` or XLA's ``memory_analysis`` of the step, torch's
``max_memory_allocated``; on CPU the process's max RSS (a high-water mark, labelled so).
Compile time: JAX lower + compile of the step; torch.compile the first step minus a median one.

The MoE sweep holds the active compute per token fixed while the routed-expert count E grows
(see :func:`sweep_point`), for each JAX dispatch back end and the original's all-experts
PyTorch math, plus a "ceiling": the same model with every routed expert active (E = k), i.e. a
dense model with exactly the active parameters and no dispatch.

``--hlo`` compiles the MoE train step at two expert counts and lists every op of the optimised
HLO whose size grows with E, other than the expert weights (and their gradients and optimizer
moments) and the router's (N, E) arrays; it also prints XLA's FLOP count
(``compiled.cost_analysis()``) per back end and E. This checks "FLOPs grow with k, not E"
without a GPU.

Results go to ``<out>/<device>-<date>.json``, ``.md`` and ``.png`` (tokens/s against E);
``--out`` defaults to ~/.cache/nanomoe/results (benchmarks/results_dir.py), so a run never
replaces a committed result unless told ``--out benchmarks/results``.

jax is imported where a cell runs: --help and --merge import no framework.
"""
from __future__ import annotations

import os

# torch shares the device: JAX must not grab 75 % of the GPU memory when it starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path
from typing import Any

from nanomoe.config import config_from_dict, config_to_dict
from nanomoe.flops import active_params, device_peak_flops, flops_per_token

from .bench_args import fill_defaults, make_parser
from .configs import FAST_COMPILE, PRESETS, RESULT_TAG, Preset, model_configs, total_params
from .env import environment, measure_matmul_peak
from .moe_sweep import sweep_cells
from .hlo_check import cost_table, hlo_growth_check
from .report import merge_reports, render_markdown, write_report
from .results_dir import default_out, where_note
from .interleave import run_interleaved
from .timing import run_cell, run_isolated


def build_cells(args, preset: Preset) -> list[dict]:
    """Every (config, framework) to time, torch first: on a shared GPU the caching allocator
    gives its memory back (empty_cache) while XLA's allocator keeps what it grew to."""
    configs = model_configs(preset, args.shape)
    jax_options = dict(scan_layers=args.scan_layers, remat=args.remat,
                       attention_impl=args.attention_impl,
                       loss_chunk_tokens=args.loss_chunk_tokens, row_groups=args.row_groups,
                       compiler_options=FAST_COMPILE if args.fast_compile else None)
    common = dict(B=args.B, T=args.T, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                  seed=args.seed, jax_options=jax_options, isolated=args.isolate)
    cells = []

    def add(config, framework, labels):
        cells.append(dict(common, config=config_to_dict(config), framework=framework,
                          labels=labels))

    for name in args.models:
        for fw in args.frameworks:
            cfg = configs[name]
            backend = _jax_dispatch(cfg) if (fw == "jax" and name == "moegpt") else None
            add(cfg, fw, dict(section="models", model=name, backend=backend))

    if args.experts:
        sweep_cells(args, configs["moegpt"], add)
    order = {"torch": 0, "torch-compile": 1, "jax": 2}
    return sorted(cells, key=lambda c: order[c["framework"]])  # stable: keeps the rest in order


def _jax_dispatch(config) -> str:
    """The MoE back end the JAX cell runs: execution_options may pick one per device."""
    import jax

    from nanomoe_jax.execution import execution_options

    return execution_options(jax.devices()[0], config).moe_dispatch or config.moe_dispatch


def _describe(spec: dict) -> str:
    lab = spec["labels"]
    return " ".join(str(x) for x in (lab["section"], lab["model"], spec["framework"],
                                     lab.get("backend") or "",
                                     f"E={lab['E']}" if "E" in lab else "") if x)


def add_mfu(results: list[dict], peak: dict) -> None:
    for r in results:
        if "tokens_per_s" not in r:
            continue
        achieved = r["flops_per_token"] * r["tokens_per_s"]
        r["model_tflops"] = achieved / 1e12
        r["mfu_measured"] = achieved / peak["measured"] if peak.get("measured") else None
        r["mfu_datasheet"] = achieved / peak["datasheet"] if peak.get("datasheet") else None


def run(args) -> dict:
    env = environment()
    print(f"device: {env['device']}  jax {env['jax']}  torch {env.get('torch')}  "
          f"preset {args.preset}  B={args.B} T={args.T} dtype={args.dtype}")
    report: dict[str, Any] = {"meta": _meta(args, env), "results": [], "hlo": None, "cost": None}
    cells = build_cells(args, PRESETS[args.preset])
    if args.list:
        _list_cells(cells, args.T)
        return report
    if cells:
        report["meta"]["peak_flops"] = _measure_peak(args, env)
    report["results"] += _time_cells(args, cells)
    if cells:
        add_mfu(report["results"], report["meta"]["peak_flops"])
    if args.hlo:
        report["hlo"], report["cost"] = _hlo_checks(args)
    return report


def _meta(args, env: dict) -> dict:
    return {
        "command": "python -m benchmarks.bench " + shlex.join(args.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "preset": args.preset, "overrides": args.shape, "B": args.B, "T": args.T,
        "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
        "isolate": args.isolate, "fast_compile": args.fast_compile,
        "rounds": args.rounds,
        "jax_options": dict(scan_layers=args.scan_layers, remat=args.remat,
                            attention_impl=args.attention_impl,
                            loss_chunk_tokens=args.loss_chunk_tokens,
                            row_groups=args.row_groups),
        "sweep": dict(mode=args.sweep_mode, experts=list(args.experts), shared=1,
                      capacity_factor=args.capacity_factor, backends=list(args.backends)),
        "env": env,
    }


def _list_cells(cells: list[dict], T: int) -> None:
    for spec in cells:
        c = config_from_dict(spec["config"])
        print(f"{_describe(spec):45s} params {total_params(c) / 1e6:8.1f}M  active "
              f"{active_params(c) / 1e6:6.1f}M  {flops_per_token(c, T) / 1e6:8.1f} "
              "MFLOP/token")


def _measure_peak(args, env: dict) -> dict:
    """A square matmul's FLOP/s in each framework, and the datasheet's where the card is known."""
    peak = {"matmul_n": args.matmul_n, "matmul_dtype": args.dtype}
    peak.update({f"measured_{k}": v for k, v in measure_matmul_peak(
        args.matmul_n, args.dtype, tuple(args.frameworks)).items()})
    peak["measured"] = max(v for k, v in peak.items() if k.startswith("measured_"))
    peak["datasheet"] = device_peak_flops(env["device"]) if env["device"] != "cpu" else None
    print(f"{args.dtype} matmul {args.matmul_n}^3: "
          + ", ".join(f"{k[9:]} {v / 1e12:.3g} TFLOP/s" for k, v in peak.items()
                      if k.startswith("measured_"))
          + (f"; datasheet {peak['datasheet'] / 1e12:.0f}" if peak["datasheet"] else ""))
    return peak


def _time_cells(args, cells: list[dict]) -> list[dict]:
    results = []
    if args.rounds > 1:  # the model cells in turn; the sweep (if any) after them as usual
        models = [c for c in cells if c["labels"]["section"] == "models"]
        cells = [c for c in cells if c["labels"]["section"] != "models"]
        print(f"{len(models)} cells interleaved, {args.rounds} rounds of {args.steps} steps",
              flush=True)
        results += run_interleaved(models, args.rounds)
    for i, spec in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {_describe(spec)}", flush=True)
        res = run_isolated(spec) if args.isolate else run_cell(spec)
        results.append(res)
        if "tokens_per_s" in res:
            print(f"    {res['tokens_per_s']:,.0f} tok/s  step {1e3 * res['step_s']:.1f} ms"
                  + (f"  compile {res['compile_s']:.1f} s" if "compile_s" in res else ""),
                  flush=True)
    return results


def _hlo_checks(args) -> tuple[list, list]:
    """The HLO growth check and the FLOP table, on the tiny model."""
    base = model_configs(PRESETS["tiny"], args.shape)["moegpt"]
    tb, tt = PRESETS["tiny"].B, PRESETS["tiny"].T
    opts = FAST_COMPILE if args.fast_compile else None
    print(f"HLO check: {', '.join(args.hlo_dispatches)} at E = {args.hlo_experts} "
          f"(tiny model, B={tb} T={tt})")
    hlo = [hlo_growth_check(base, tb, tt, tuple(args.hlo_experts), d, compiler_options=opts)
           for d in args.hlo_dispatches]
    print("cost analysis:", ", ".join(args.cost_dispatches), "at E =", args.cost_experts)
    cost = cost_table(base, tb, tt, tuple(args.cost_experts), tuple(args.cost_dispatches),
                      compiler_options=opts)
    return hlo, cost


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(argv)
    args.argv = list(argv)
    if not (args.merge or args._cell):
        fill_defaults(p, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._cell:  # a child of --isolate: one cell, one result line
        print(RESULT_TAG + json.dumps(run_cell(json.loads(args._cell)), default=str))
        return {}
    if args.merge:
        report = merge_reports(args.merge)
    else:
        report = run(args)
        if args.list:
            return report
    out = Path(args.out) if args.out else default_out()
    paths = write_report(report, out)
    print()
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(where_note(out, chosen=args.out is not None))
    report["paths"] = {k: str(v) for k, v in paths.items()}
    return report


if __name__ == "__main__":
    main()
