"""One prepared command for a GPU machine's few minutes (issue 24): the environment, numerics
on the GPU, the train step of GPT, ModernGPT, MoeGPT and MoeGPT-64 timed against torch eager
and torch.compile at the original's defaults (B=16, T=1024, bf16), a few real ``train.py``
steps, and planned vs measured memory and step time per model.

    PYTHONPATH=. python3 -m benchmarks.gpu_check              # GPU machine: <= 8 min on an H100
    PYTHONPATH=. python3 -m benchmarks.gpu_check --dry-run    # any machine: same parts, tiny sizes

Writes ``gpu-<card>-<date>.{json,md}`` to ``--out`` (default ``$OUT/benchmarks/results`` when
``$OUT`` is set, else ``benchmarks/results``) and prints the tables last. Exit 2 with one
sentence when the GPU is not visible to both jax and torch (not in a dry run); otherwise 0,
whatever parts failed: the report says which.

Every part runs in its own Python process (``gpu_check_parts.py``): the peak memory measured is
that model's alone, and a part that crashes, hangs or runs out of memory costs only itself.
This process imports neither jax nor torch. ``--budget_s`` is wall time for everything: a part
gets at most what is left after the minimum every later part needs, and is skipped when that
is below its own minimum. Optional wheels (``wheels/``, see prepare_gpu_wheels.sh) are
installed into a scratch folder, never into the image's Python, and put on the parts' path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .gpu_check_report import card_slug, render_markdown, render_tables
from .gpu_check_run import install_wheels, parse_train_output, run_child

MODELS = ("gpt", "moegpt", "moderngpt", "moegpt-64")  # the two the targets name first
FRAMEWORKS = ("jax", "torch", "torch-compile")
DRY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Part:
    name: str
    cmd: list[str]
    est_s: float  # a guess, printed beside the limit; the limit is what binds
    min_s: float  # below this much time the part is skipped, not started
    cap_s: float  # never more than this, even with budget to spare
    result: dict = field(default_factory=dict)


def sizes(args) -> dict:
    """What each part runs: the original's defaults on a GPU, tiny ones in a dry run."""
    if args.dry_run:
        tiny = dict(n_layer=1, n_embd=64, n_head=4, block_size=64, vocab_size=256)
        return dict(dry=True, dtype="bfloat16", shape=tiny, B=2, T=32, rounds=2, steps=1,
                    warmup=1, numerics=dict(shape=tiny, B=2, T=32), matmul_n=256,
                    train=["--n_layer", "1", "--n_embd", "64", "--n_head", "4", "--B", "2",
                           "--T", "64", "--total_batch_size", "128"])
    # numerics: every layer kind at the original's widths, 2 layers, a batch that still
    # takes the flash-attention and grouped-GEMM paths but compiles in seconds
    return dict(dry=False, dtype="bfloat16", shape={}, B=16, T=1024, rounds=args.rounds,
                steps=args.steps, warmup=3, numerics=dict(shape=dict(n_layer=2), B=4, T=256),
                matmul_n=8192, train=[])


def build_parts(args, sz: dict, log_dir: Path) -> list[Part]:
    py = [sys.executable, "-m", "benchmarks.gpu_check_parts"]
    spec = json.dumps(sz)
    dry = args.dry_run
    parts = [Part("env", py + ["env", spec], 15, 5, 60 if dry else 120),
             Part("numerics", py + ["numerics", spec], 40 if dry else 90, 20, 300)]
    for m in args.models:
        parts.append(Part(f"timing:{m}", py + ["timing", spec, m, ",".join(args.frameworks)],
                          15 if dry else 75, 10 if dry else 40, 180 if dry else 240))
    steps = str(args.train_steps)
    train = [sys.executable, "train.py", "--framework", "jax", "--model", "moegpt",
             "--max_steps", steps, "--log_dir", str(log_dir), "--eval_steps", "1",
             "--sample_tokens", "8", *sz["train"]]
    parts.append(Part("train", train, 40 if dry else 75, 20 if dry else 45, 300))
    return parts


def limit_for(parts: list[Part], i: int, deadline: float) -> float:
    later = sum(p.min_s for p in parts[i + 1:] if not p.result)
    return min(parts[i].cap_s, deadline - time.monotonic() - later)


def run(args) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    sz = sizes(args)
    work = args.work
    wheels = (install_wheels(Path(args.wheels), work / "site") if args.wheels
              else {"status": "none (dry run)"})
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",  # torch shares the device
               PYTHONWARNINGS="default::DeprecationWarning,default::FutureWarning")
    if args.dry_run:
        # the benchmark's --fast-compile as flags: no LLVM optimisation, ~4x faster compiles
        # of the ~20 tiny programs; slower steps, which a dry run does not care about
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *DRY_XLA_FLAGS]).strip()
    if wheels.get("site"):
        env["NANOMOE_GPU_CHECK_SITE"] = wheels["site"]  # the env part lists what it holds
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (wheels.get("site"), str(ROOT), env.get("PYTHONPATH")) if p)
    report = {"meta": {"command": "PYTHONPATH=. python3 -m benchmarks.gpu_check "
                                  + shlex.join(args.argv),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       "budget_s": args.budget_s, "dry_run": args.dry_run, "sizes": sz},
              "wheels": wheels, "parts": [], "deprecations": []}
    parts = build_parts(args, sz, work / "train_log")
    for i, part in enumerate(parts):
        limit = limit_for(parts, i, deadline)
        row = {"part": part.name, "limit_s": round(max(limit, 0), 1)}
        if limit < part.min_s:
            row.update(status="skipped", reason=f"{max(limit, 0):.0f} s left for it, needs "
                                                f"{part.min_s:.0f} s (--budget_s)")
            print(f"[{i + 1}/{len(parts)}] {part.name}: skipped ({row['reason']})", flush=True)
            report["parts"].append(row)
            part.result = {"skipped": True}
            store(report, part)
            continue
        print(f"[{i + 1}/{len(parts)}] {part.name} (limit {limit:.0f} s, "
              f"{deadline - time.monotonic():.0f} s of budget left)", flush=True)
        # train.py runs as a user runs it: XLA may preallocate (nothing else shares the GPU)
        child_env = env if part.name != "train" else dict(
            env, XLA_PYTHON_CLIENT_PREALLOCATE=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                              "true"))
        out = run_child(part.cmd, limit, child_env, cwd=ROOT)
        row.update(status=out["status"], seconds=round(out["seconds"], 1))
        if out.get("error"):
            row["error"] = out["error"]
        report["parts"].append(row)
        report["deprecations"] += [w for w in out["warnings"] if w not in report["deprecations"]]
        part.result = out.get("result") or {"error": out.get("error")}
        if out.get("result") is None and out.get("partials"):  # what it had before it stopped
            if part.name == "numerics":
                part.result["checks"] = out["partials"]
            else:
                part.result = dict(out["partials"][-1], error=out.get("error"))
        if part.name == "train":
            part.result = parse_train_output(out["lines"], out["status"])
        store(report, part)
        if part.name == "env" and not gpu_visible(report, args):
            return 2
    report["meta"]["wall_s"] = round(time.monotonic() - t_start, 1)
    paths = write(report, args)
    print()
    print(render_tables(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def store(report: dict, part: Part) -> None:
    if part.name.startswith("timing:"):
        report.setdefault("timing", {})[part.name.split(":", 1)[1]] = part.result
    else:
        report[part.name] = part.result


def gpu_visible(report: dict, args) -> bool:
    env = report.get("env") or {}
    seen = env.get("visible") or {}
    for line in env.get("summary", []):
        print("  " + line)
    if args.dry_run or (seen.get("jax_gpu") and seen.get("torch_cuda")):
        return True
    if not seen:  # the part itself failed: jax or torch does not even import
        print(f"error: the environment part failed ({env.get('error', 'no result')}), so "
              "nothing was timed; see its output above.", file=sys.stderr)
        return False
    which = [n for n, k in (("jax", "jax_gpu"), ("torch", "torch_cuda")) if not seen.get(k)]
    print(f"error: no GPU visible to {' and '.join(which)} (jax backend "
          f"{env.get('jax_backend', '?')}, torch.cuda.is_available() "
          f"{seen.get('torch_cuda', '?')}), so nothing was timed; run this on the GPU machine "
          "or pass --dry-run.", file=sys.stderr)
    return False


def write(report: dict, args) -> list[Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = card_slug((report.get("env") or {}).get("device", "unknown"))
    stem = f"gpu-{card}-{report['meta']['date'][:10]}"
    n = 1
    while (out / f"{stem}.json").exists():  # a second run the same day keeps the first
        n += 1
        stem = f"gpu-{card}-{report['meta']['date'][:10]}-{n}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(render_markdown(report))
    return [out / f"{stem}.json", out / f"{stem}.md"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="tiny sizes, any device (CPU included): checks the script end to end")
    p.add_argument("--budget_s", "--budget-s", type=float, default=None,
                   help="wall seconds for everything; parts that would not fit are skipped "
                        "(default: 480 on a GPU; 600 for --dry-run, whose parts crawl on a "
                        "loaded machine)")
    # as benchmarks.bench: results land in the repository only when asked (--out)
    default_out = (Path(os.environ["OUT"]) / "benchmarks" / "results" if os.environ.get("OUT")
                   else Path.home() / ".cache" / "nanomoe" / "results")
    p.add_argument("--out", default=str(default_out), help=f"folder (default: {default_out})")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list among {', '.join(MODELS)} to time (default: all)")
    p.add_argument("--frameworks", default=None,
                   help="comma list among jax, torch, torch-compile (default: all three; "
                        "jax,torch for --dry-run, where inductor's CPU compile takes minutes)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps a round (default: 10)")
    p.add_argument("--train_steps", type=int, default=None,
                   help="train.py steps (default: 6 on a GPU, 3 in a dry run)")
    p.add_argument("--wheels", default=None,
                   help="folder of optional wheels to install first (default: wheels/, none "
                        "for --dry-run: they are built for the GPU image's jax, and would "
                        "shadow this machine's packages)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: {', '.join(bad)} unknown; choose among {', '.join(MODELS)}")
    args.frameworks = [f.strip() for f in (args.frameworks or (
        "jax,torch" if args.dry_run else ",".join(FRAMEWORKS))).split(",") if f.strip()]
    if not args.frameworks or set(args.frameworks) - set(FRAMEWORKS):
        p.error(f"--frameworks: choose among {', '.join(FRAMEWORKS)}")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    if args.wheels is None:
        args.wheels = "" if args.dry_run else str(ROOT / "wheels")
    args.budget_s = args.budget_s or (600.0 if args.dry_run else 480.0)
    args.train_steps = args.train_steps or (3 if args.dry_run else 6)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # wheels' site, train.py's log
    try:
        return run(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
