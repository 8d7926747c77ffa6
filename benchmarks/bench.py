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

from .configs import (BACKENDS, FAST_COMPILE, FRAMEWORKS, MODELS, PRESETS, RESULT_TAG, Preset,
                      model_configs, total_params)
from .moe_sweep import sweep_cells
from .env import environment, has_cuda, measure_matmul_peak
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
    preset = PRESETS[args.preset]
    env = environment()
    print(f"device: {env['device']}  jax {env['jax']}  torch {env.get('torch')}  "
          f"preset {args.preset}  B={args.B} T={args.T} dtype={args.dtype}")
    report: dict[str, Any] = {
        "meta": {
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
        },
        "results": [], "hlo": None, "cost": None,
    }
    cells = build_cells(args, preset)
    if args.list:
        for spec in cells:
            c = config_from_dict(spec["config"])
            print(f"{_describe(spec):45s} params {total_params(c) / 1e6:8.1f}M  active "
                  f"{active_params(c) / 1e6:6.1f}M  {flops_per_token(c, args.T) / 1e6:8.1f} "
                  "MFLOP/token")
        return report
    if cells:
        peak = {"matmul_n": args.matmul_n, "matmul_dtype": args.dtype}
        peak.update({f"measured_{k}": v for k, v in measure_matmul_peak(
            args.matmul_n, args.dtype, tuple(args.frameworks)).items()})
        peak["measured"] = max(v for k, v in peak.items() if k.startswith("measured_"))
        peak["datasheet"] = device_peak_flops(env["device"]) if env["device"] != "cpu" else None
        report["meta"]["peak_flops"] = peak
        print(f"{args.dtype} matmul {args.matmul_n}^3: "
              + ", ".join(f"{k[9:]} {v / 1e12:.3g} TFLOP/s" for k, v in peak.items()
                          if k.startswith("measured_"))
              + (f"; datasheet {peak['datasheet'] / 1e12:.0f}" if peak["datasheet"] else ""))
    if args.rounds > 1:  # the model cells in turn; the sweep (if any) after them as usual
        models = [c for c in cells if c["labels"]["section"] == "models"]
        cells = [c for c in cells if c["labels"]["section"] != "models"]
        print(f"{len(models)} cells interleaved, {args.rounds} rounds of {args.steps} steps",
              flush=True)
        report["results"] += run_interleaved(models, args.rounds)
    for i, spec in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {_describe(spec)}", flush=True)
        res = run_isolated(spec) if args.isolate else run_cell(spec)
        report["results"].append(res)
        if "tokens_per_s" in res:
            print(f"    {res['tokens_per_s']:,.0f} tok/s  step {1e3 * res['step_s']:.1f} ms"
                  + (f"  compile {res['compile_s']:.1f} s" if "compile_s" in res else ""),
                  flush=True)
    if cells:
        add_mfu(report["results"], report["meta"]["peak_flops"])
    if args.hlo:
        base = model_configs(PRESETS["tiny"], args.shape)["moegpt"]
        tb, tt = PRESETS["tiny"].B, PRESETS["tiny"].T
        opts = FAST_COMPILE if args.fast_compile else None
        print(f"HLO check: {', '.join(args.hlo_dispatches)} at E = {args.hlo_experts} "
              f"(tiny model, B={tb} T={tt})")
        report["hlo"] = [hlo_growth_check(base, tb, tt, tuple(args.hlo_experts), d,
                                          compiler_options=opts) for d in args.hlo_dispatches]
        print("cost analysis:", ", ".join(args.cost_dispatches), "at E =", args.cost_experts)
        report["cost"] = cost_table(base, tb, tt, tuple(args.cost_experts),
                                    tuple(args.cost_dispatches), compiler_options=opts)
    return report


def _csv(kind, choices=None, none_ok=True):
    def parse(text: str):
        if none_ok and text.strip().lower() in ("", "none"):
            return ()
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if kind is int:
            items = tuple(int(t) for t in items)
        bad = [t for t in items if choices and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {choices}")
        return items
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Training throughput (tokens/s, MFU, memory, compile time) of the JAX "
                    "models against the PyTorch reference, an MoE sweep over the routed-expert "
                    "count at fixed active compute, and an HLO/FLOPs check of the MoE step.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes: 'original' (the original's defaults, B=16 T=1024), 'tiny', "
                        "'cpu-nanogpt' (nanoGPT's CPU quick start: GPT 4x128, B=12, T=64, "
                        "bytes) or 'cpu-default' (train.py's CPU preset: MoeGPT 4x128, B=8, "
                        "T=256); default: original on a GPU, tiny otherwise")
    p.add_argument("--models", type=_csv(str, MODELS), default=None,
                   help="comma list of models to time, or 'none' (default: the preset's; all "
                        "four for original and tiny)")
    p.add_argument("--frameworks", type=_csv(str, FRAMEWORKS), default=FRAMEWORKS,
                   help="comma list among jax, torch (eager), torch-compile (default: all)")
    p.add_argument("--experts", type=_csv(int), default=None,
                   help="routed-expert counts of the MoE sweep, or 'none' "
                        "(default: the preset's, 4..64 original, 4,8,16 tiny)")
    p.add_argument("--backends", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="JAX MoE dispatch back ends of the sweep (default: all three)")
    p.add_argument("--sweep-mode", choices=("fixed", "fine"), default="fixed",
                   help="fixed (default): k and expert width constant, so the active expert "
                        "parameters are too; fine: k*H constant, experts shrink as E grows")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the dense ceiling (E = k) of the sweep (default: on)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="capacity_factor of the capacity dispatch in the sweep (default: 1.25)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (per round with --rounds; default: preset's)")
    p.add_argument("--rounds", type=int, default=None,
                   help="> 1: build the model cells once and time them in turn, this many "
                        "rounds, order reversed every other round; reports median and spread "
                        "(default: the preset's, 8 for cpu-*, else 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: preset's)")
    p.add_argument("--B", type=int, default=None, help="batch size (default: preset's)")
    p.add_argument("--T", type=int, default=None, help="sequence length (default: preset's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype of both frameworks (default: bfloat16 on a GPU, "
                        "float32 on CPU where bf16 is emulated)")
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=INT",
                   help="override a size field of every model of the preset (and of the HLO "
                        "check's tiny model), e.g. --set n_layer=1; repeatable")
    g = p.add_argument_group("JAX model options (the GPU optimisation plan varies these)")
    # defaults (None): what nanomoe_jax.execution_options picks for the device, as train.py
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="one lax.scan over the layers or a Python loop (default: scan)")
    g.add_argument("--remat", choices=("none", "full", "dots"), default=None,
                   help="rematerialisation policy per layer (default: execution_options')")
    g.add_argument("--attention-impl", choices=("xla", "cudnn", "custom_vjp"), default=None,
                   help="attention implementation (default: cudnn flash attention on NVIDIA "
                        "GPUs >= sm_80 in bf16, custom_vjp on CPU, xla elsewhere)")
    g.add_argument("--loss-chunk-tokens", type=int, default=None,
                   help="tokens per cross-entropy chunk (default: execution_options', 8192)")
    g.add_argument("--row-groups", type=int, default=None,
                   help="independent row groups per micro-batch (default: execution_options', "
                        "2 on CPU, else 1)")
    g.add_argument("--fast-compile", action="store_true",
                   help="skip XLA's LLVM optimisations (CPU smoke tests: faster compiles, "
                        "slower steps; never for real measurements)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: 8192 for "
                        "original, 512 for tiny)")
    p.add_argument("--isolate", action="store_true",
                   help="run every cell in its own process: exact per-cell peak memory, and an "
                        "OOM cannot disturb later cells (costs an import per cell)")
    h = p.add_argument_group("HLO and FLOPs check (always on the tiny model)")
    h.add_argument("--hlo", action="store_true",
                   help="list HLO ops growing with E and XLA's FLOPs per back end and E")
    h.add_argument("--hlo-experts", type=_csv(int, none_ok=False), default=(13, 52),
                   help="the two routed-expert counts the HLO shapes are compared at (default: "
                        "13,52; E, E-S and the slot count must not equal another dimension of the "
                        "model: see 'collisions' in the report)")
    h.add_argument("--hlo-dispatches", type=_csv(str, BACKENDS), default=("capacity", "dense"),
                   help="back ends whose HLO is checked (default: capacity,dense)")
    h.add_argument("--cost-experts", type=_csv(int, none_ok=False), default=(4, 8, 16, 32, 64),
                   help="routed-expert counts of the FLOP table (default: 4,8,16,32,64)")
    h.add_argument("--cost-dispatches", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="back ends of the FLOP table (default: all three)")
    p.add_argument("--list", action="store_true",
                   help="print the cells this command would time (sizes, FLOPs) and exit")
    p.add_argument("--out", default=None,
                   help="folder for .json/.md/.png (default: $NANOMOE_RESULTS or "
                        "~/.cache/nanomoe/results; --out benchmarks/results adds to the "
                        "committed results)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="write one report from earlier runs' JSON files and exit")
    p.add_argument("--_cell", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.merge or args._cell:
        return args
    gpu = has_cuda()
    args.preset = args.preset or ("original" if gpu else "tiny")
    try:
        shape = dict(kv.split("=", 1) for kv in args.overrides)
        shape = {k: int(v) for k, v in shape.items()}
    except ValueError:
        p.error(f"--set takes FIELD=INT, got {args.overrides}")
    bad = sorted(set(shape) - {"n_layer", "n_embd", "n_head", "block_size", "vocab_size"})
    if bad:
        p.error(f"--set: {bad} not among n_layer, n_embd, n_head, block_size, vocab_size")
    args.shape = shape
    preset = PRESETS[args.preset]
    for name in ("steps", "warmup", "B", "T", "matmul_n", "models", "rounds"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.experts is None:
        args.experts = preset.experts
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if len(args.hlo_experts) != 2:
        p.error("--hlo-experts takes two counts")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.rounds > 1 and args.isolate:
        p.error("--rounds times the cells in one process: it cannot be combined with --isolate")
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
