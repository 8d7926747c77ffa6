"""Tables of ``benchmarks.gpu_check``: markdown for the results file, the same tables printed
last on the console."""

from __future__ import annotations

import re

GiB = 2 ** 30
CARDS = ("GH200", "H200", "H100", "H800", "B200", "A100", "L40S", "L40", "L4", "RTX 4090")
# issue 24's targets: GPT >= 45 % MFU on an H100, MoeGPT >= 0.85x GPT's MFU, JAX >= 1.15x
# torch.compile for GPT and ModernGPT and >= 2x for MoeGPT
SPEEDUP_TARGETS = {"gpt": 1.15, "moderngpt": 1.15, "moegpt": 2.0}


def card_slug(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; unknown cards keep their whole name."""
    for name in CARDS:  # longest names that contain others first
        if name.lower() in device_kind.lower():
            return name.lower().replace(" ", "-")
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def _f(x, spec="{:.1f}", scale=1.0):
    return "-" if x is None else spec.format(x * scale)


def timing_table(report: dict) -> list[str]:
    lines = ["| model | framework | median ms | p10 ms | p90 ms | tokens/s | MFU (datasheet) "
             "| peak GiB measured | planned GiB | compile s | JAX speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, part in (report.get("timing") or {}).items():
        if part.get("skipped") or not part.get("rows"):
            why = "skipped (budget)" if part.get("skipped") else str(part.get("error"))[:120]
            lines.append(f"| {model} | {why} |" + " |" * 9)
            continue
        if part.get("error"):  # timed, then cut short (the calibration is what is missing)
            lines.append(f"| {model} | after timing: {part['error'][:100]} |" + " |" * 9)
        rows = {r["framework"]: r for r in part["rows"]}
        cal = part.get("calibration") or {}
        jax_s = rows.get("jax", {}).get("step_s")
        for fw, r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {fw}: {r['error'][:100]} |" + " |" * 9)
                continue
            planned = cal.get("planned_peak_bytes") if fw == "jax" else None
            speed = (f"{r['step_s'] / jax_s:.2f}x" if jax_s and fw != "jax" else "-")
            lines.append(
                f"| {model} | {fw} | {_f(r['step_s'], scale=1e3)} | "
                f"{_f(r.get('step_p10_s'), scale=1e3)} | {_f(r.get('step_p90_s'), scale=1e3)} | "
                f"{r['tokens_per_s']:,.0f} | {_f(r.get('mfu_datasheet'), '{:.1%}')} | "
                f"{_f(r.get('peak_mem_bytes'), '{:.2f}', 1 / GiB)} | "
                f"{_f(planned, '{:.2f}', 1 / GiB)} | {_f(r.get('compile_s'))} | {speed} |")
    ran = [f"- {m}: {r['jax_execution']}" for m, part in (report.get("timing") or {}).items()
           for r in part.get("rows", []) if r.get("jax_execution")]
    lines += ["", "JAX ran with:", *ran] if ran else []
    lines += ["", "JAX speed-up: that row's median step over JAX's (> 1: JAX is faster). MFU: "
              "6 N_active + 12 L C T FLOPs a token over the card's datasheet bf16 peak. Peak "
              "memory: JAX's peak_bytes_in_use in a process of its own; torch's "
              "max_memory_allocated, which with both torch cells live counts the other cell's "
              "weights and AdamW state too. Planned: XLA's memory analysis of the timed "
              "program (the plan's formula)."]
    return lines


def calibration_table(report: dict) -> list[str]:
    lines = ["| model | planned peak GiB | measured GiB | measured / planned | committed plan "
             "GiB | est. step ms (roofline) | measured ms | measured / est. | committed plan "
             "est. ms | compiled / analytic FLOPs | flash |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    source = None
    for model, part in (report.get("timing") or {}).items():
        cal = part.get("calibration")
        if not cal:
            continue
        plan = cal.get("committed_plan") or {}
        source = cal["card_figures"]["source"]
        lines.append(
            f"| {model} | {_f(cal['planned_peak_bytes'], '{:.2f}', 1 / GiB)} | "
            f"{_f(cal.get('measured_peak_bytes'), '{:.2f}', 1 / GiB)} | "
            f"{_f(cal.get('peak_measured_over_planned'), '{:.2f}')} | "
            f"{_f(plan.get('peak_bytes'), '{:.2f}', 1 / GiB)} | "
            f"{_f(cal.get('est_step_s'), scale=1e3)} | "
            f"{_f(cal.get('measured_step_s'), scale=1e3)} | "
            f"{_f(cal.get('step_measured_over_estimate'), '{:.2f}')} | "
            f"{_f(plan.get('est_step_s'), scale=1e3)} | {_f(cal.get('flops_ratio'), '{:.3f}')} "
            f"| {'yes' if cal.get('flash_attention') else 'no'} |")
    if source:
        lines += ["", f"**est.** = the plan's roofline (per kernel max(FLOPs / peak, bytes / "
                  f"bandwidth), card figures: {source}) of the timed JAX program: an estimate, "
                  "not a measurement. Committed plan: benchmarks/results/plan-*.json "
                  "(deviceless compile, CI's jax)."]
    return lines


def targets_lines(report: dict) -> list[str]:
    timing = report.get("timing") or {}

    def row(model, fw):
        part = timing.get(model) or {}
        return next((r for r in part.get("rows", []) if r["framework"] == fw
                     and "step_s" in r), None)

    out = []
    gpt = row("gpt", "jax")
    if gpt and gpt.get("mfu_datasheet") is not None:
        out.append(f"- GPT MFU {gpt['mfu_datasheet']:.1%} (target >= 45% on an H100)")
        moe = row("moegpt", "jax")
        if moe and moe.get("mfu_datasheet") is not None:
            out.append(f"- MoeGPT MFU / GPT MFU {moe['mfu_datasheet'] / gpt['mfu_datasheet']:.2f}"
                       " (target >= 0.85)")
    for model, target in SPEEDUP_TARGETS.items():
        j, c = row(model, "jax"), row(model, "torch-compile")
        if j and c:
            ratio = c["step_s"] / j["step_s"]
            out.append(f"- {model}: JAX {ratio:.2f}x torch.compile (target >= {target}x): "
                       + ("met" if ratio >= target else "NOT met"))
    return out


def numerics_lines(report: dict) -> list[str]:
    num = report.get("numerics") or {}
    if not num.get("checks"):
        return [f"numerics: {num.get('error') or 'not run'}"]
    lines = [f"| check | ok | loss rel | grad norm rel | logits rel | torch bf16 loss rel "
             f"(context) |", "|---|---|---:|---:|---:|---:|"]
    for c in num["checks"]:
        if "error" in c:
            lines.append(f"| {c['check']} | FAILED: {c['error'][:120]} | | | | |")
            continue
        lines.append(f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | "
                     f"{_f(c.get('loss_rel'), '{:.2e}')} | {_f(c.get('grad_norm_rel'), '{:.2e}')}"
                     f" | {_f(c.get('logits_rel'), '{:.2e}')} | "
                     f"{_f(c.get('torch_bf16_loss_rel'), '{:.2e}')} |")
    lines += ["", f"Tolerance {num['tolerance']} relative (the tests' bf16 bound); step rows: "
              "JAX bf16 vs torch fp32 on the device, same weights and batch."]
    return lines


def parts_lines(report: dict) -> list[str]:
    lines = ["| part | status | seconds | limit s | note |", "|---|---|---:|---:|---|"]
    for p in report["parts"]:
        note = (p.get("error") or p.get("reason") or "").replace("|", "/")[:200]
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds', '-')} | "
                     f"{p['limit_s']} | {note} |")
    return lines


def render_tables(report: dict) -> str:
    """What the console shows last: timings, calibration, targets, the train.py line."""
    env = report.get("env") or {}
    train = report.get("train") or {}
    lines = [f"## {env.get('device', '?')}: train step, B={report['meta']['sizes']['B']} "
             f"T={report['meta']['sizes']['T']} bf16", "", *timing_table(report), "",
             "## Planned vs measured (JAX)", "", *calibration_table(report), "",
             "## Targets", "", *(targets_lines(report) or ["- no timings to compare"]), "",
             "## train.py --framework jax --model moegpt", "",
             train.get("last_line") or f"no step line ({train.get('error', 'not run')})"]
    if train.get("tokens_per_s_median"):
        lines.append(f"median {train['tokens_per_s_median']:,.0f} tok/s over "
                     f"{train['steps_logged']} logged steps")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    m, env = report["meta"], report.get("env") or {}
    head = [f"# GPU check: {env.get('device', '?')}, {m['date'][:10]}"
            + (" (dry run: tiny sizes, numbers mean nothing)" if m["dry_run"] else ""), "",
            f"`{m['command']}`  ", f"wall {m.get('wall_s', '-')} s of a {m['budget_s']:.0f} s "
            "budget", "", *[f"- {s}" for s in env.get("summary", [])],
            f"- wheels: {report['wheels'].get('status')}", "", "## Parts", "",
            *parts_lines(report), "", "## Numerics (before timing)", "",
            *numerics_lines(report), ""]
    deps = report.get("deprecations") or []
    tail = ["", "## Deprecation warnings", "", *([f"- `{d}`" for d in deps] or ["none"]), ""]
    return "\n".join(head) + "\n" + render_tables(report) + "\n" + "\n".join(tail)
