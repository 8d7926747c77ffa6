"""Command line of the GPU plan (``python -m benchmarks.plan``): tables, files, the check."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from .targets import GiB, TARGETS


def parse_args(argv):
    from .plan import MODELS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plan",
        description="Compile the train step for a GPU (deviceless without one) and report "
                    "planned memory, kernels, FLOPs and a roofline estimate per model.")
    p.add_argument("--target", choices=TARGETS, default="rtx4090")
    p.add_argument("--model", default="all",
                   help=f"comma list among {', '.join(MODELS)} (default: all)")
    p.add_argument("--B", type=int, default=16, help="batch rows (default 16)")
    p.add_argument("--T", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="config field (n_layer=24) or execution option (attention_impl=xla, "
                        "remat=dots, loss_chunk_tokens=4096, scan_layers=false); repeatable")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a bound breaks: peak over budget, no flash attention, "
                        "compiled/analytic FLOPs > 1.10")
    p.add_argument("--out", default="benchmarks/results", help="folder for plan-<target>.json/md")
    args = p.parse_args(argv)
    names = list(MODELS) if args.model == "all" else args.model.split(",")
    bad = [n for n in names if n not in MODELS]
    if bad:
        p.error(f"--model: {', '.join(bad)} unknown; choose among {', '.join(MODELS)} or all")
    args.models = names
    if args.B < 1 or args.T < 1:
        p.error("--B and --T must be positive")
    args.overrides, args.options = split_sets(p, args.sets)
    return args


OPTION_FIELDS = {"attention_impl": str, "remat": str, "loss_chunk_tokens": int,
                 "scan_layers": lambda v: v.lower() in ("1", "true", "yes"), "dtype": str}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def split_sets(p, sets):
    overrides, options = {}, {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"--set takes FIELD=VALUE, got {item!r}")
        if key in OPTION_FIELDS:
            options[key] = OPTION_FIELDS[key](value)
        else:
            overrides[key] = _value(value)
    return overrides, options


def render(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU plan: {m['target']} ({m['device_kind']}), B={m['B']} T={m['T']}", "",
             f"`{m['command']}`  ", f"{m['date']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
             f"compiled on a {m['device']} device", "",
             "| model | options | planned peak GiB (budget) | flash attention | GEMM back end "
             "| grouped GEMM | fusions | compiled / analytic FLOPs | TFLOP/step | GB accessed "
             "| est. step ms | est. tokens/s | est. MFU bound |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        e = r["estimate"]
        gemm = ", ".join(f"{k} {v}" for k, v in sorted(r["gemm_backends"].items())) or "-"
        lines.append(
            f"| {r['model']} | {r['options']} | {r['memory']['peak'] / GiB:.1f} "
            f"({r['budget_bytes'] / GiB:.0f}) | {'yes' if r['flash_attention'] else 'no'} | "
            f"{gemm} | {'yes' if r['grouped_gemm'] else 'no'} | {r['fusions']} | "
            f"{r['flops_ratio']:.3f} | {r['compiled_flops'] / 1e12:.2f} | "
            f"{r['bytes_accessed'] / 1e9:.1f} | {1e3 * e['step_s']:.0f} | "
            f"{e['tokens_per_s']:,.0f} | {100 * e['mfu_bound']:.0f}% |")
    lines += ["", "Peak = XLA's memory_analysis (arguments + outputs - aliased + temporaries). "
              "FLOPs: matmuls counted from the optimised HLO (loop bodies x trip count, cuBLAS "
              "and cuDNN custom calls from their operand shapes) against 6 N_active + 12 L C T "
              "(XLA attention) or + 6 L C T (causal flash). **est.** columns are a roofline "
              "estimate (per kernel max(FLOPs / datasheet bf16 peak, bytes / bandwidth)), not "
              "a measurement.", ""]
    broken = report.get("broken") or []
    lines += ["Bounds (peak <= budget, flash attention, FLOPs ratio <= 1.10): "
              + ("all hold" if not broken else "; ".join(broken)), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import jax
    import jaxlib

    from .plan import broken_bounds, plan
    from .targets import load_target

    target = load_target(args.target)
    rows, broken = [], []
    for name in args.models:
        print(f"planning {name} for {target.device_kind} ...", file=sys.stderr, flush=True)
        try:
            row = plan(name, target, args.B, args.T, args.overrides, args.options)
        except RuntimeError as e:  # no plugin: one sentence, exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (TypeError, ValueError) as e:  # a bad --set
            print(f"error: --set: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        broken += broken_bounds(row)
    report = {"meta": {"command": "python -m benchmarks.plan " + shlex.join(argv),
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "target": target.name, "device_kind": target.device_kind,
                       "device": rows[0]["device"], "B": args.B, "T": args.T,
                       "jax": jax.__version__, "jaxlib": jaxlib.__version__},
              "rows": rows, "broken": broken}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(report)
    (out / f"plan-{target.name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"plan-{target.name}.md").write_text(md)
    print(md)
    print(f"wrote {out}/plan-{target.name}.json and .md")
    if args.check and broken:
        for line in broken:
            print(f"bound broken: {line}", file=sys.stderr)
        return 1
    return 0
