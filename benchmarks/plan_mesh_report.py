"""Markdown of a multi-GPU plan (``python -m benchmarks.plan_mesh``)."""

from __future__ import annotations

from .targets import GiB

TOP = 6  # collectives listed per layout


def render(report: dict) -> str:
    m = report["meta"]
    lines = [f"# Multi-GPU plan: {m['topology']} x {m['device_kind']} ({m['devices']} devices)",
             "", "; ".join(f"`{c}`" for c in m["command"].split("; ")) + "  ",
             f"{m['date']}, jax {m['jax']}, compiled deviceless", "",
             "| model | mesh | A | peak GiB/device | state GiB/device | collectives GiB/step "
             "| ideal GiB | ratio | FLOPs compiled/analytic | est. compute ms/step "
             "| est. MFU bound | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mesh']} | {r['A']} | does not compile: "
                         f"{r['error'][:90]} | | | | | | | | |")
            continue
        ratio = f"{r['collective_ratio']:.2f}" if r["collective_ratio"] else "-"
        lines.append(
            f"| {r['model']} | {r['mesh']} | {r['A']} | {r['memory']['peak'] / GiB:.2f} | "
            f"{r['state_bytes'] / GiB:.2f} | {r['collective_bytes'] / GiB:.3f} | "
            f"{r['ideal']['total'] / GiB:.3f} | {ratio} | {_flops(r)} | "
            f"{_estimate(r)} | {r['compile_s']} |")
    lines += ["", "Per device and optimizer step. Collective bytes: the buffer each device hands "
              "to a collective (all-reduce operand, gathered all-gather result, full "
              "reduce-scatter input, all-to-all operand; a ragged all-to-all, which sends only the "
              "rows its sizes name: the smaller of its operand and its output) times the trip "
              "counts of the loops "
              "around it. Ideal: each gradient all-reduced once a step in fp32 over the devices "
              "holding the same shard; fsdp: per micro-batch, weights gathered forward and "
              "backward in bf16 and the fp32 gradient reduce-scattered (so it stays sharded); "
              "expert = 4 all-to-alls of the "
              "N k routed rows per MoE layer and micro-batch. State: parameters, AdamW moments "
              "and an fp32 gradient of the device's shard. **est.**: a roofline estimate of one "
              "device's kernels (per kernel max(FLOPs / datasheet peak, bytes / bandwidth)), "
              "collectives left out, not a measurement. FLOPs on an expert mesh: the busiest "
              "device's grouped GEMMs charged for the rows it receives at uniform routing (they "
              "skip the receive buffer's empty slots); in brackets every slot computed, the bound "
              "no routing exceeds.", ""]
    lines += _expert_buffers(report["rows"])
    for r in report["rows"]:
        if "error" in r:
            continue
        lines += [f"## {r['model']} --mesh {r['mesh']}, A={r['A']}", "",
                  "| kind | buffer | MiB per run | runs/step | count | group | loop |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for c in r["collectives"][:TOP]:
            lines.append(f"| {c['kind']} | {c['buffer']} | {c['bytes'] / 2**20:.1f} | "
                         f"{c['runs']} | {c['count']} | {c['group']} | {c['loop']} |")
        rest = len(r["collectives"]) - TOP
        if rest > 0:
            lines.append(f"| ... {rest} smaller | | | | | | |")
        lines.append("")
    broken = report.get("broken") or []
    lines += ["Bounds (compiles, collectives <= 1.15x ideal, FLOPs <= 1.10x analytic): "
              + ("all hold" if not broken else "; ".join(broken)), ""]
    return "\n".join(lines)


def _flops(r: dict) -> str:
    slots = r.get("flops_ratio_all_slots", r["flops_ratio"])
    extra = f" ({slots:.3f})" if slots > r["flops_ratio"] + 5e-4 else ""
    return f"{r['flops_ratio']:.3f}{extra}"


def _estimate(r: dict) -> str:
    e = r.get("estimate")
    return f"{1e3 * e['compute_s']:.1f} | {100 * e['mfu_bound']:.0f}%" if e else "- | -"


def _expert_buffers(rows) -> list[str]:
    """One line per expert layout: the receive buffers (X x cap rows a device, what the CPU's
    padded all_to_all sends) against the N k routed rows (mesh_hlo.ideal_bytes)."""
    out = []
    for r in rows:
        ideal = r.get("ideal") or {}
        if ideal.get("expert_buffer") and ideal.get("expert_all_to_all"):
            out.append(f"- {r['model']} {r['mesh']} A={r['A']}: the receive buffers (X x cap "
                       f"rows, expert_parallel.py) hold {ideal['expert_buffer'] / GiB:.3f} GiB, "
                       f"{ideal['expert_buffer'] / ideal['expert_all_to_all']:.2f}x the N k "
                       f"routed rows' {ideal['expert_all_to_all'] / GiB:.3f} GiB: what the "
                       f"padded exchange (CPU) sends; GPUs send the rows (ragged)")
    return out + [""] if out else []
