"""Cells timed in turn (``--rounds``): every cell is built once, then each runs ``steps``
steps per round, round after round, the order reversed every other round.

On a shared CPU the load changes by the second; timing one framework after the other would
give each a different machine. Interleaving gives every cell the same mix of quiet and busy
stretches, and the spread (p10 .. p90 of all timed steps, per-round medians) shows how much
the load moved. The p10 is the "quiet machine" figure; the median is what a busy one gives.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from nanomoe.config import config_from_dict
from nanomoe.flops import active_params, flops_per_token

from .configs import total_params
from .env import pipelined_steps, timed_steps
from .timing import _free_memory, _is_oom, prepare_jax, prepare_torch


def _error(out: dict, e: Exception) -> None:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    out["error"] = "OOM" if _is_oom(msg) else msg
    print(f"    ! {out['framework']}: {out['error']}", file=sys.stderr)


def run_interleaved(specs: list[dict], rounds: int) -> list[dict]:
    """One result per spec, in the format of ``timing.run_cell`` plus the spread fields."""
    cells: list[dict[str, Any]] = []
    for spec in specs:
        config = config_from_dict(spec["config"])
        out = dict(spec["labels"], framework=spec["framework"], B=spec["B"], T=spec["T"],
                   params_total=total_params(config), params_active=active_params(config),
                   flops_per_token=flops_per_token(config, spec["T"]))
        cell = {"spec": spec, "out": out, "times": [], "round_medians": []}
        try:
            prepare = prepare_jax if spec["framework"] == "jax" else prepare_torch
            cell["res"], cell["step"], cell["sync"], cell["finish"] = prepare(config, spec)
            # warm-up: the first call of torch.compile traces and compiles
            cell["warm"] = timed_steps(cell["step"], cell["sync"], 0, max(spec["warmup"], 1))
            print(f"    ready: {spec['labels']['model']} {spec['framework']}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing cell is a result, the others go on
            _error(out, e)
        cells.append(cell)
    live = [c for c in cells if "step" in c]
    for r in range(rounds):
        for cell in (live if r % 2 == 0 else live[::-1]):
            if "error" in cell["out"]:
                continue
            try:
                t = pipelined_steps(cell["step"], cell["sync"], cell["spec"]["steps"])
            except Exception as e:  # noqa: BLE001
                _error(cell["out"], e)
                continue
            cell["times"] += t
            cell["round_medians"].append(float(np.median(t)))
        print(f"    round {r + 1}/{rounds}: " + ", ".join(
            f"{c['spec']['framework']} {1e3 * c['round_medians'][-1]:.1f} ms"
            for c in live if c["round_medians"] and "error" not in c["out"]), flush=True)
    results = []
    for cell in cells:
        out = cell["out"]
        if "finish" in cell and "error" not in out:
            out.update(cell["finish"]())
            times = np.asarray(cell["times"])
            step_s = float(np.median(times))
            out.update(step_s=step_s, tokens_per_s=out["B"] * out["T"] / step_s,
                       step_p10_s=float(np.percentile(times, 10)),
                       step_p90_s=float(np.percentile(times, 90)),
                       step_min_s=float(times.min()), rounds=rounds, timed_steps=len(times),
                       round_medians_s=cell["round_medians"], first_step_s=cell["warm"][0],
                       step_s_all=[float(t) for t in times])
            if out["framework"] == "torch-compile":
                out["compile_s"] = max(0.0, cell["warm"][0] - step_s)
        _free_memory(out["framework"])
        results.append(out)
    cells.clear()
    return results


def render_rounds(results: list[dict]) -> list[str]:
    """Markdown: step-time spread per cell and the JAX/torch ratios of the median and p10."""
    rows = [r for r in results if r.get("rounds") and "step_s" in r]
    if not rows:
        return []
    lines = ["## Interleaved rounds (step time over all timed steps)", "",
             (f"{rows[0]['rounds']} rounds; the last two columns are torch eager's step time "
              "over the row's (> 1: faster than torch eager), of the median and of the p10 "
              "(the quiet-machine figure)."),
             "",
             ("| model | B x T | framework | median ms | p10 ms | p90 ms | min ms | tokens/s "
              "(median) | compile s | steps | vs torch (median) | vs torch (p10) |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = next((c for c in rows if c["model"] == r["model"] and c["framework"] == "torch"
                  and c["B"] == r["B"] and c["T"] == r["T"]), None)
        ratio = ratio10 = "-"
        if r["framework"] != "torch" and t is not None:
            ratio = f"{t['step_s'] / r['step_s']:.2f}"
            ratio10 = f"{t['step_p10_s'] / r['step_p10_s']:.2f}"
        fw = r["framework"] + (f" ({r['backend']})" if r.get("backend") else "")
        comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        lines.append(f"| {r['model']} | {r['B']} x {r['T']} | {fw} | {1e3 * r['step_s']:.1f} | "
                     f"{1e3 * r['step_p10_s']:.1f} | {1e3 * r['step_p90_s']:.1f} | "
                     f"{1e3 * r['step_min_s']:.1f} | {r['tokens_per_s']:,.0f} | {comp} | "
                     f"{r['timed_steps']} | {ratio} | {ratio10} |")
    lines.append("")
    lines += [f"JAX ran with: {r['jax_execution']} ({r['model']})" for r in rows
              if r.get("jax_execution")]
    return lines + [""]
