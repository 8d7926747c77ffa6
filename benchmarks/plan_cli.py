"""Command line of the GPU plan (``python -m benchmarks.plan``): tables, files, the check."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import jax
import jaxlib

from .plan import MODELS, RECIPE_TOKENS, add_mfu_ratios, broken_bounds, plan, recipe_accumulation
from .results_dir import default_out, where_note
from .targets import GiB, TARGETS, load_target


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plan",
        description="Compile the train step for a GPU (deviceless without one) and report "
                    "planned memory, kernels, FLOPs and a roofline estimate per model.")
    p.add_argument("--target", choices=TARGETS, default="rtx4090")
    p.add_argument("--model", default="all",
                   help=f"comma list among {', '.join(MODELS)} (default: all)")
    p.add_argument("--B", type=int, default=16, help="batch rows (default 16)")
    p.add_argument("--T", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--A", type=int, default=None,
                   help=f"micro-batches per optimizer step (default: train.py's on one card, "
                        f"{RECIPE_TOKENS} tokens / (B x T): 16 at the defaults)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="config field (n_layer=24) or execution option (attention_impl=xla, "
                        "remat=dots, loss_chunk_tokens=4096, scan_layers=false, "
                        "moe_dispatch=grouped); repeatable")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a bound breaks: peak over budget, no flash attention, "
                        "a custom call whose FLOPs cannot be counted, compiled/analytic "
                        "FLOPs > 1.10")
    p.add_argument("--out", default=None,
                   help="folder for plan-<target>.json/md (default: ~/.cache/nanomoe/results, "
                        "outside the repository; --out benchmarks/results replaces the "
                        "committed reference)")
    args = p.parse_args(argv)
    names = list(MODELS) if args.model == "all" else args.model.split(",")
    bad = [n for n in names if n not in MODELS]
    if bad:
        p.error(f"--model: {', '.join(bad)} unknown; choose among {', '.join(MODELS)} or all")
    args.models = names
    if args.B < 1 or args.T < 1 or (args.A is not None and args.A < 1):
        p.error("--B, --T and --A must be positive")
    args.A = args.A or recipe_accumulation(args.B, args.T)
    args.overrides, args.options = split_sets(p, args.sets)
    return args


OPTION_FIELDS = {"attention_impl": str, "remat": str, "loss_chunk_tokens": int,
                 "scan_layers": lambda v: v.lower() in ("1", "true", "yes"), "dtype": str,
                 "moe_dispatch": str}


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


def _moe_cell(r: dict) -> str:
    m = r.get("moe_bytes")
    return f"{m['total'] / r.get('A', 1) / 1e9:.1f} ({m['ratio']:.1f}x)" if m else "-"


def _row(r: dict) -> str:
    e = r["estimate"]
    A = r.get("A", 1)  # the per-step totals shown per micro-batch
    gemm = ", ".join(f"{k} {round(v / A)}" for k, v in sorted(r["gemm_backends"].items())) or "-"
    uncounted = ", ".join(sorted(r.get("uncounted", {}))) or "none"
    vs_gpt = f"{e['mfu_vs_gpt']:.2f}" if "mfu_vs_gpt" in e else "-"
    return (f"| {r['model']} | {r['options']} | {r['memory']['peak'] / GiB:.1f} "
            f"({r['budget_bytes'] / GiB:.0f}) | {'yes' if r['flash_attention'] else 'no'} | "
            f"{gemm} | {'yes' if r['grouped_gemm'] else 'no'} | {r['fusions']} | "
            f"{r['flops_ratio']:.3f} | {uncounted} | {r['compiled_flops'] / A / 1e12:.2f} | "
            f"{r['bytes_accessed'] / A / 1e9:.1f} | {_moe_cell(r)} | "
            f"{1e3 * e['step_s'] / A:.1f} | "
            f"{e['tokens_per_s']:,.0f} | {100 * e['mfu_bound']:.0f}% | {vs_gpt} |")


def render_moe(rows: list[dict]) -> list[str]:
    """The MoE layers' bytes by part, and their largest kernels."""
    moe = [r for r in rows if r.get("moe_bytes")]
    if not moe:
        return []
    lines = ["## MoE-layer bytes per micro-batch (GB)", "",
             "| model | MoE layers | minimum | x minimum | per-tile weights | scan residuals "
             "| dispatch glue | matmul operands |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in moe:
        m, gb = r["moe_bytes"], 1e9 * r.get("A", 1)
        lines.append(f"| {r['model']} | {m['total'] / gb:.1f} | {m['minimum'] / gb:.1f} | "
                     f"{m['ratio']:.2f} | {m['tile_weights'] / gb:.1f} | "
                     f"{m['residuals'] / gb:.1f} | {m['glue'] / gb:.1f} | "
                     f"{m['matmul'] / gb:.1f} |")
    lines.append("")
    for r in moe:
        glue = sorted(r["moe_bytes"].get("glue_parts", {}).items(), key=lambda x: -x[1])
        gb = 1e9 * r.get("A", 1)
        lines.append(f"- {r['model']} glue: " + ", ".join(f"{k} {v / gb:.1f}" for k, v in glue))
    lines += ["", "Issue 22's targets (reported, not in `--check`): MoE-layer bytes <= 2.5x "
              "the minimum, est. MFU >= 0.8x GPT's: " + "; ".join(
                  f"{r['model']} {r['moe_bytes']['ratio']:.1f}x, "
                  f"{r['estimate'].get('mfu_vs_gpt', float('nan')):.2f}x" for r in moe)]
    lines += ["", "Minimum: every MoE matmul operand read once and every result written once, "
              "no padding (benchmarks/NOTES.md, `hlo_moe.min_moe_bytes`). Parts: "
              "`benchmarks/hlo_moe.py`. Largest MoE kernels (GB per optimizer step, runs):",
              ""]
    for r in moe:
        top = r["moe_bytes"].get("top_kernels", [])[:5]
        lines.append(f"- {r['model']}: " + "; ".join(
            f"{k['kernel']} {k['bytes'] / 1e9:.2f} (x{k['runs']}, {'/'.join(k['ops'][:4])})"
            for k in top))
    return lines + [""]


def render(report: dict) -> str:
    m = report["meta"]
    A = m.get("A", 1)
    lines = [f"# GPU plan: {m['target']} ({m['device_kind']}), B={m['B']} T={m['T']}, "
             f"A={A} micro-batches per optimizer step", "",
             f"`{m['command']}`  ", f"{m['date']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
             f"compiled on a {m['device']} device", "",
             "| model | options | planned peak GiB (budget) | flash attention | GEMM back end "
             "(per micro-batch) | grouped GEMM | fusions per step | compiled / analytic FLOPs | uncounted kernels "
             "| TFLOP per micro-batch | GB accessed per micro-batch | MoE-layer GB per "
             "micro-batch (x minimum) | est. ms per micro-batch "
             "| est. tokens/s | est. MFU bound | est. MFU vs gpt |",
             "|---|---|---:|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |" + " |" * 14)
            continue
        lines.append(_row(r))
    lines += ["", "Peak = XLA's memory_analysis (arguments + outputs - aliased + temporaries). "
              "FLOPs: matmuls counted from the optimised HLO (loop bodies x trip count; cuBLAS, "
              "cuDNN, Triton GEMM fusions and grouped-GEMM kernels from their operand shapes, "
              "Pallas kernels from their `flops` metadata; any other custom call is listed as "
              "uncounted) against 6 N_active + 12 L C T (XLA attention) or + 6 L C T (causal "
              "flash). Bytes: each kernel's operands read once and results written once, "
              "slices and in-place updates as their size. **est.** columns are a roofline "
              "estimate (per kernel max(FLOPs / datasheet bf16 peak, bytes / bandwidth)), not "
              "a measurement. The step compiled is train.py's: A micro-batches (a `lax.scan`) "
              "and one AdamW update, so per micro-batch = the step's total / A, the update "
              "included, and MFU is the step's; `--A 1` plans one micro-batch and its update "
              "(the update then weighs A times more).", ""]
    broken = report.get("broken") or []
    lines += ["Bounds (peak <= budget, flash attention, every kernel counted, nothing dropped, "
              "FLOPs ratio <= 1.10): " + ("all hold" if not broken else "; ".join(broken)), ""]
    return "\n".join(lines + render_moe(report["rows"]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    target = load_target(args.target)
    rows, broken = [], []
    for name in args.models:
        print(f"planning {name} for {target.device_kind} ...", file=sys.stderr, flush=True)
        try:
            row = plan(name, target, args.B, args.T, args.overrides, args.options, args.A)
        except RuntimeError as e:  # no plugin: one sentence, exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (TypeError, ValueError) as e:  # a bad --set
            print(f"error: --set: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        broken += broken_bounds(row)
    add_mfu_ratios(rows)
    report = {"meta": {"command": "python -m benchmarks.plan " + shlex.join(argv),
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "target": target.name, "device_kind": target.device_kind,
                       "device": rows[0]["device"], "B": args.B, "T": args.T, "A": args.A,
                       "jax": jax.__version__, "jaxlib": jaxlib.__version__},
              "rows": rows, "broken": broken}
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    md = render(report)
    (out / f"plan-{target.name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"plan-{target.name}.md").write_text(md)
    print(md)
    print(f"wrote plan-{target.name}.json and .md: " + where_note(out, bool(args.out)))
    if args.check and broken:
        for line in broken:
            print(f"bound broken: {line}", file=sys.stderr)
        return 1
    return 0
