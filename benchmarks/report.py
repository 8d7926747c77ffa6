"""The benchmark's report: markdown tables, the sweep plot, files, merging runs.

matplotlib is imported where the plot is drawn: slow to import, and the tables need none.
"""

from __future__ import annotations

import json
from pathlib import Path

from .env import slug
from .interleave import render_rounds


def _fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


def _gib(b):
    return None if b is None else b / 2 ** 30


def _ratio(a, b):
    return None if not a or not b else a / b


def _fw_label(r):
    fw = r["framework"]
    return f"{fw} ({r['backend']})" if fw == "jax" and r.get("backend") else fw


def render_markdown(report: dict) -> str:
    rs = report["results"]
    return "\n".join(_header(report["meta"]) + render_rounds(rs) + _models(rs)
                     + _sweep(report["meta"], rs) + _errors(rs) + _hlo(report.get("hlo"))
                     + _cost(report.get("cost")))


def _header(m: dict) -> list[str]:
    """Command, preset and options, versions, the measured peak."""
    env = m["env"]
    commands = m.get("commands") or [m["command"]]  # several when merged
    lines = [f"# Benchmark: {env['device']}, {m['date']}", "",
             *[f"`{c}`  " for c in commands], "",
             f"preset **{m['preset']}**" + (f" with {m['overrides']}" if m.get("overrides") else "")
             + f", B={m['B']}, T={m['T']}, dtype {m['dtype']}, "
             f"{m['steps']} timed steps after {m['warmup']} warm-up (median), "
             f"JAX options {m['jax_options']}" + (", **fast-compile (timings not representative)**"
                                                   if m.get("fast_compile") else ""), "",
             _versions(env), ""]
    peak = m.get("peak_flops")
    if peak:
        lines += [f"peak: {peak.get('matmul_dtype', 'bfloat16')} matmul {peak['matmul_n']}^3 "
                  "measured "
                  + ", ".join(f"{k[9:]} {v / 1e12:.3g} TFLOP/s" for k, v in peak.items()
                              if k.startswith("measured_"))
                  + (f"; datasheet {peak['datasheet'] / 1e12:.0f} TFLOP/s" if peak.get("datasheet")
                     else "; datasheet: unknown device"), ""]
    if env["device"] == "cpu":
        lines += ["On CPU the absolute numbers mean little (tiny shapes, no tensor cores, bf16 "
                  "emulated, other processes share the cores); read the ratio columns.", ""]
    return lines


def _versions(env: dict) -> str:
    return ("versions: " + ", ".join(f"{k} {env.get(k)}" for k in
                                     ("jax", "jaxlib", "flax", "optax", "torch", "torch_cuda",
                                      "cudnn", "jax_platform_version", "python")
                                     if env.get(k) is not None)
            + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
            + (f"; CPU: {env.get('cpu_affinity')} of {env.get('cpu_count')} cores usable, "
               f"torch threads {env.get('torch_threads')}" if env["device"] == "cpu" else ""))


def _models(rs: list[dict]) -> list[str]:
    """One row per model cell, then tokens/s ratios between the frameworks."""
    models = [r for r in rs if r["section"] == "models"]
    if not models:
        return []
    lines = ["## Models", "", "| model | framework | tokens/s | step ms | MFU (measured peak) "
             "| MFU (datasheet) | peak memory GiB | memory source | compile s | loss |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in models:
        lines.append(_row(r, [r["model"], _fw_label(r)]))
    lines += ["", "### Ratios (tokens/s)", "",
              "| model | jax | torch | torch-compile | JAX/torch | JAX/torch-compile |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in models):
        tps = {r["framework"]: r.get("tokens_per_s") for r in models if r["model"] == name}
        j, t, tc = tps.get("jax"), tps.get("torch"), tps.get("torch-compile")
        lines.append(f"| {name} | {_fmt(j)} | {_fmt(t)} | {_fmt(tc)} | "
                     f"{_fmt(_ratio(j, t), '.2f')} | {_fmt(_ratio(j, tc), '.2f')} |")
    return lines + [""]


def _sweep(m: dict, rs: list[dict]) -> list[str]:
    """The MoE sweep's cells (each against its ceiling), then ratios against torch eager."""
    sweep = [r for r in rs if r["section"] in ("sweep", "ceiling")]
    if not sweep:
        return []
    sw = m["sweep"]
    lines = [f"## MoE sweep ({sw['mode']}: S={sw['shared']} shared expert, "
             f"capacity_factor {sw['capacity_factor']})", "",
             "Rows `ceiling` are the same model with every routed expert active (E = k): "
             "a dense FFN of the active width, the throughput a perfect dispatch reaches.",
             "", "| E | k | H | total params | active params | framework | tokens/s | "
             "step ms | MFU (measured peak) | MFU (datasheet) | peak memory GiB | "
             "memory source | compile s | loss | dropped | ÷ ceiling |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sweep:
        e = f"ceiling (E={r['E']})" if r["section"] == "ceiling" else str(r["E"])
        c = _ceiling(rs, r)
        lines.append(_row(r, [e, r["k"], r["H"], f"{r['params_total'] / 1e6:.1f}M",
                              f"{r['params_active'] / 1e6:.1f}M", _fw_label(r)])
                     + f" {_fmt(r.get('dropped_fraction'), '.3f')} |"
                     + f" {_fmt(_ratio(r.get('tokens_per_s'), c), '.2f')} |")
    return lines + _sweep_ratios(sweep) + [""]


def _sweep_ratios(sweep: list[dict]) -> list[str]:
    lines = ["", "### Ratios against PyTorch eager (tokens/s of the column ÷ torch)", ""]
    fws = list(dict.fromkeys(_fw_label(r) for r in sweep))
    lines += ["| E | " + " | ".join(fws) + " | " + " | ".join(
                  f"{f}/torch" for f in fws if f != "torch") + " |",
              "|---|" + "---:|" * (2 * len(fws) - ("torch" in fws))]
    for sec, E in dict.fromkeys((r["section"], r["E"]) for r in sweep):
        tps = {_fw_label(r): r.get("tokens_per_s") for r in sweep
               if r["section"] == sec and r["E"] == E}
        t = tps.get("torch")
        name = f"ceiling (E={E})" if sec == "ceiling" else str(E)
        lines.append(f"| {name} | " + " | ".join(_fmt(tps.get(f)) for f in fws) + " | "
                     + " | ".join(_fmt(_ratio(tps.get(f), t), ".2f") for f in fws
                                  if f != "torch") + " |")
    return lines


def _errors(rs: list[dict]) -> list[str]:
    errors = [r for r in rs if r.get("error")]
    if not errors:
        return []
    return ["## Failed cells", ""] + [
        f"- {r['section']} {r['model']} {_fw_label(r)}"
        + (f" E={r['E']}" if "E" in r else "") + f": {r['error']}" for r in errors] + [""]


def _hlo(hlo: list[dict] | None) -> list[str]:
    """Per dispatch: how many HLO shapes grow with E beyond those expected, the first few."""
    if not hlo:
        return []
    lines = ["## HLO check: ops whose size grows with E", ""]
    for h in hlo:
        lines += [f"`{h['dispatch']}` dispatch, E = {h['experts'][0]} vs {h['experts'][1]} "
                  f"(tiny model, B={h['B']} T={h['T']}): **{len(h['grows_with_E'])}** "
                  f"unexpected growing shapes, {len(h['expected_growth'])} expected "
                  f"(expert weights/grads/moments, router (N, E), O(E) bookkeeping); "
                  f"{len(h['unmatched'])} larger and {len(h['unmatched_small'])} O(E)-small "
                  f"shapes present only at the larger E"
                  + (f"; size collisions {h['collisions']}" if h["collisions"] else ""), ""]
        for r in h["grows_with_E"][:10]:
            lines.append(f"- grows: {r['dtype']}[{','.join(r['symbolic'])}] = "
                         f"{r['shape']} (x{r['growth']:.1f}, {r['count']} ops)")
        for r in h["unmatched"][:5]:
            lines.append(f"- only at E={h['experts'][1]}: {r['dtype']}{r['shape']} "
                         f"({r['elements']:,} elements)")
        lines.append("")
    return lines


def _cost(cost: list[dict] | None) -> list[str]:
    if not cost:
        return []
    lines = ["## XLA cost analysis of the compiled train step (tiny model, layers unrolled)",
             "", "| dispatch | E | k | H | XLA GFLOP/step | ÷ first E | analytic 6N+12LCT "
             "GFLOP/step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in cost:
        lines.append(f"| {r['dispatch']} | {r['E']} | {r['k']} | {r['H']} | "
                     f"{r['xla_flops'] / 1e9:.3f} | {r['vs_first_E']:.2f} | "
                     f"{r['analytic_flops'] / 1e9:.3f} |")
    return lines + [""]


def _ceiling(results: list[dict], r: dict) -> float | None:
    """tokens/s of the ceiling that row ``r`` is held against: for every JAX back end the JAX
    ``dense`` dispatch at E = k (no dispatch work at all), for torch the same framework's."""
    fw = "jax (dense)" if r["framework"] == "jax" else _fw_label(r)
    return next((c.get("tokens_per_s") for c in results if c["section"] == "ceiling"
                 and _fw_label(c) == fw and c["k"] == r["k"] and c["H"] == r["H"]), None)


def _row(r: dict, first: list) -> str:
    cells = [str(x) for x in first]
    if r.get("error"):
        return "| " + " | ".join(cells) + f" | {r['error'][:40]} |" + " |" * 7
    cells += [_fmt(r.get("tokens_per_s")), _fmt(1e3 * r["step_s"], ".1f"),
              _fmt(_pct(r.get("mfu_measured")), ".1f"), _fmt(_pct(r.get("mfu_datasheet")), ".1f"),
              _fmt(_gib(r.get("peak_mem_bytes")), ".2f"), r.get("peak_mem_source", "-"),
              _fmt(r.get("compile_s"), ".1f"), _fmt(r.get("loss"), ".3f")]
    return "| " + " | ".join(cells) + " |"


def _pct(x):
    return None if x is None else 100 * x


def render_plot(report: dict, path: Path) -> bool:
    """tokens/s against E per back end (log2 E), ceilings dashed in the same colour."""
    sweep = [r for r in report["results"] if r["section"] == "sweep" and "tokens_per_s" in r]
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, fw in enumerate(dict.fromkeys(_fw_label(r) for r in sweep)):
        pts = sorted((r["E"], r["tokens_per_s"]) for r in sweep if _fw_label(r) == fw)
        color = f"C{i}"
        ax.plot(*zip(*pts), "o-", color=color, label=fw)
        ceil = [r["tokens_per_s"] for r in report["results"]
                if r["section"] == "ceiling" and _fw_label(r) == fw and "tokens_per_s" in r]
        if ceil and fw in ("jax (dense)", "torch", "torch-compile"):  # merged runs: the first
            ax.axhline(ceil[0], color=color, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    es = sorted({r["E"] for r in sweep})
    ax.set_xticks(es, [str(e) for e in es])
    ax.minorticks_off()
    ax.set_xlabel("routed experts E (fixed active compute)" if report["meta"]["sweep"]["mode"]
                  == "fixed" else "routed experts E (fine-grained, k*H fixed)")
    ax.set_ylabel("training tokens/s")
    m = report["meta"]
    ax.set_title(f"MoeGPT train step, {m['env']['device']}, B={m['B']} T={m['T']} "
                 f"({m['preset']})\ndashed: dense ceiling (E = k)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = report["meta"]["env"]
    preset = report["meta"].get("preset") or ""
    # the CPU presets run at two sizes on the same day: the preset names the file
    stem = "-".join([slug(env["device"])] + ([preset] if preset.startswith("cpu-") else [])
                    + [report["meta"]["date"][:10]])
    if (out_dir / f"{stem}.json").exists():  # several runs a day: keep each
        stem += "-" + report["meta"]["date"][11:19].replace(":", "")
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["md"].write_text(render_markdown(report))
    if render_plot(report, out_dir / f"{stem}.png"):
        paths["png"] = out_dir / f"{stem}.png"
    return paths


def merge_reports(paths: list[str]) -> dict:
    """One report from several runs of the same device (e.g. pieces that each fit a time
    limit): the first run's header, everything's results, the last HLO/cost check."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0])
    merged["results"] = [r for rep in reports for r in rep["results"]]
    merged["hlo"] = next((r["hlo"] for r in reversed(reports) if r.get("hlo")), None)
    merged["cost"] = next((r["cost"] for r in reversed(reports) if r.get("cost")), None)
    merged["meta"] = dict(reports[0]["meta"], merged_from=[str(p) for p in paths],
                          commands=[r["meta"]["command"] for r in reports])
    return merged


