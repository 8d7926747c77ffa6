"""The parts of ``benchmarks.gpu_check``, each run as its own process:

    python -m benchmarks.gpu_check_parts env SIZES_JSON
    python -m benchmarks.gpu_check_parts numerics SIZES_JSON
    python -m benchmarks.gpu_check_parts timing SIZES_JSON MODEL FRAMEWORKS

A part prints progress, then one result line (``gpu_check_run.RESULT_TAG`` + JSON). The timing
part reuses the benchmark's cells read-only (``timing.prepare_*`` through
``interleave.run_interleaved``) and the plan's configs, memory formula and roofline.

jax, torch and the plan (which imports jax) are imported where a part uses them: each part
imports only what it runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from nanomoe.config import config_to_dict
from nanomoe.flops import device_peak_flops

from . import hlo, timing
from .env import environment, measure_matmul_peak
from .gpu_check_numerics import numerics_part
from .gpu_check_report import card_slug
from .gpu_check_run import PARTIAL_TAG, RESULT_TAG
from .interleave import run_interleaved
from .targets import target_for_device

RESULTS = Path(__file__).parent / "results"
# The plan's file for a card (H200: the H100's program and memory plan; its estimate is the
# H100's bandwidth, so an upper bound on the H200's step time).
PLAN_FILE = {"h100": "plan-h100.json", "h200": "plan-h100.json",
             "rtx-4090": "plan-rtx4090.json"}
# datasheet dense bf16 FLOP/s and HBM bytes/s for cards without a target proto (estimates'
# inputs, labelled as datasheet figures in the report)
DATASHEET = {"H200": (989e12, 4.8e12)}
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                 "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "chex", "torch",
                 "triton", "transformers", "safetensors", "tiktoken", "numpy", "tokamax")


def env_part(sz: dict) -> dict:
    """Versions, the device as jax and torch see it, the driver, a bf16 matmul peak."""
    env = environment()
    env["distributions"] = {}
    for name in DISTRIBUTIONS:
        try:
            env["distributions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    site = os.environ.get("NANOMOE_GPU_CHECK_SITE")
    if site:  # the carried wheels, as this process sees them
        env["carried"] = {d.metadata["Name"]: d.version
                          for d in metadata.distributions(path=[site])}
    import jax
    import torch

    env["visible"] = {"jax_gpu": jax.default_backend() == "gpu",
                      "torch_cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["torch_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    stats = jax.devices()[0].memory_stats() or {}
    env["jax_bytes_limit"] = stats.get("bytes_limit")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi_header"] = [ln for ln in smi.stdout.splitlines() if "Version" in ln][:1]
    except (OSError, subprocess.SubprocessError):
        pass
    # no GPU outside a dry run: the parent stops after this part, and an 8192^3 bf16 matmul
    # on a CPU would take minutes
    if sz["dry"] or all(env["visible"].values()):
        env["matmul_peak"] = matmul_peak(sz)
    d = env["distributions"]
    env["summary"] = [
        f"device: {env['device']} x{env['device_count']} ({env['jax_backend']}); torch: "
        f"{env.get('torch_device', 'no CUDA device')}; {env.get('nvidia_smi', 'no nvidia-smi')}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in d.items()) + f"; python "
        f"{platform.python_version()}; torch CUDA {env.get('torch_cuda')}, cuDNN "
        f"{env.get('cudnn')}",
    ]
    return env


def matmul_peak(sz: dict) -> dict:
    try:
        peaks = measure_matmul_peak(sz["matmul_n"], sz["dtype"], ("jax", "torch"))
        return {"n": sz["matmul_n"], "dtype": sz["dtype"], **peaks}
    except Exception as e:  # noqa: BLE001 - informative only, the rest goes on
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def card_figures(device_kind: str, measured_peak: float | None) -> dict:
    """Peak FLOP/s and bandwidth to estimate a step with: the plan's target for the card, a
    datasheet line, or (CPU, dry run) a nominal pair that only exercises the arithmetic."""
    t = target_for_device(SimpleNamespace(device_kind=device_kind))
    if t is not None:
        return {"peak_flops": t.peak_bf16, "bandwidth": t.bandwidth, "source": f"target {t.name}"}
    for key, (peak, bw) in DATASHEET.items():
        if key.lower() in device_kind.lower():
            return {"peak_flops": peak, "bandwidth": bw, "source": f"datasheet {key}"}
    return {"peak_flops": measured_peak or 1e11, "bandwidth": 2e10,
            "source": "nominal (no card figures: the estimate means nothing)"}


def committed_plan(card: str, model: str, B: int, T: int) -> dict | None:
    path = RESULTS / PLAN_FILE.get(card, f"plan-{card}.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if (data["meta"]["B"], data["meta"]["T"]) != (B, T):
        return None
    row = next((r for r in data["rows"] if r.get("model") == model and "memory" in r), None)
    return None if row is None else {
        "file": path.name, "date": data["meta"]["date"], "jax": data["meta"]["jax"],
        # per micro-batch (the plan's step holds A of them and one update)
        "peak_bytes": row["memory"]["peak"],
        "est_step_s": row["estimate"].get("micro_batch_s", row["estimate"]["step_s"])}


def timing_part(sz: dict, model: str, frameworks: str) -> dict:
    import jax

    from .plan import analytic_flops, model_config, peak_bytes

    config = model_config(model, sz["shape"])
    # The benchmark's JAX cell compiles its step inside prepare_jax and keeps only the callable;
    # wrapping the module's jax_train_step hands this process the compiled program too, so its
    # memory plan and roofline come from the very program timed, at no second compile.
    captured = {}
    original = timing.jax_train_step

    def capture(cfg, spec):
        out = original(cfg, spec)
        captured["compiled"] = out[0]
        return out

    timing.jax_train_step = capture
    no_opts = dict(scan_layers=None, remat=None, attention_impl=None, loss_chunk_tokens=None,
                   row_groups=None, compiler_options=None)  # None: what train.py would pick
    specs = [dict(config=config_to_dict(config), framework=fw, B=sz["B"], T=sz["T"],
                  steps=sz["steps"], warmup=sz["warmup"], dtype=sz["dtype"], seed=None,
                  jax_options=dict(no_opts), isolated=True,
                  labels=dict(section="models", model=model, backend=None))
             for fw in frameworks.split(",")]
    if model == "gpt" and "jax" in frameworks.split(","):
        # the plan's estimate for unrolled layers (the default on one GPU) against a layer
        # scan, 1.2-1.3x, measured once: the scanned step as a row of its own
        specs.append(dict(specs[0], framework="jax",
                          jax_options=dict(no_opts, scan_layers=True)))
    rows = run_interleaved(specs, sz["rounds"])
    for r in rows:
        if r.get("framework") == "jax" and "scan_layers=True" in str(r.get("jax_execution")):
            r["framework"] = "jax (scan_layers=True)"
    kind = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "cpu"
    datasheet = device_peak_flops(kind) if kind != "cpu" else None
    for r in rows:
        r.pop("step_s_all", None)
        if "tokens_per_s" in r and datasheet:
            r["mfu_datasheet"] = r["flops_per_token"] * r["tokens_per_s"] / datasheet
    out = {"model": model, "B": sz["B"], "T": sz["T"], "device_kind": kind,
           "datasheet_peak_flops": datasheet, "rows": rows}
    # the timings are what matter most: sent before the calibration's HLO parsing, which
    # takes seconds on a 12-layer program and must not be able to lose them
    print(PARTIAL_TAG + json.dumps(out, default=str), flush=True)
    jax_row = next((r for r in rows if r["framework"] == "jax"), {})
    if "compiled" in captured:
        try:  # the plan's helpers change under other work: the timings must survive that
            out["calibration"] = calibrate(captured["compiled"], config, model, kind, jax_row,
                                           sz, hlo, peak_bytes, analytic_flops, card_slug)
        except Exception as e:  # noqa: BLE001
            out["calibration_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def calibrate(compiled, config, model, kind, jax_row, sz, hlo, peak_bytes, analytic_flops,
              card_slug) -> dict:
    """Planned (XLA's memory analysis, the plan's formula) vs measured peak, and the plan's
    roofline estimate of this program vs its measured median step."""
    cal: dict = {"planned_peak_bytes": peak_bytes(compiled)["peak"],
                 "measured_peak_bytes": jax_row.get("peak_mem_bytes"),
                 "measured_peak_source": jax_row.get("peak_mem_source"),
                 "measured_step_s": jax_row.get("step_s")}
    stats = hlo.program_stats(compiled.as_text())
    flash = any("fmha" in k for k in stats.custom_calls)
    card = card_figures(kind, None)
    est = hlo.roofline_seconds(stats, card["peak_flops"], card["bandwidth"])
    cal.update(est_step_s=est, card_figures=card, flash_attention=flash,
               compiled_flops=stats.flops,
               flops_ratio=stats.flops / analytic_flops(config, sz["B"], sz["T"], flash),
               bytes_accessed=hlo.bytes_accessed(stats))
    if cal["measured_peak_bytes"] and cal["planned_peak_bytes"]:
        cal["peak_measured_over_planned"] = cal["measured_peak_bytes"] / cal["planned_peak_bytes"]
    if cal["measured_step_s"] and est:
        cal["step_measured_over_estimate"] = cal["measured_step_s"] / est
    if not sz["shape"]:  # the committed plan is for the original's sizes only
        cal["committed_plan"] = committed_plan(card_slug(kind), model, sz["B"], sz["T"])
    return cal


def main(argv: list[str]) -> int:
    name, sz = argv[0], json.loads(argv[1])
    if name == "env":
        result = env_part(sz)
    elif name == "numerics":
        result = numerics_part(sz)
    elif name == "timing":
        result = timing_part(sz, argv[2], argv[3])
    else:
        raise SystemExit(f"unknown part {name!r}")
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
