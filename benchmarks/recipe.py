"""nanoGPT's CPU quick start, reproduced: ``python -m benchmarks.recipe``.

nanoGPT's ``train_shakespeare_char`` at its CPU size (``--device=cpu --compile=False
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0``) ends at val loss 1.886 on tiny Shakespeare. This trains
the project's GPT at that size with nanoGPT's recipe (AdamW beta2 0.99, random windows, lr
1e-3 -> 1e-4 after 100 warmup steps) in both frameworks, and with the original's recipe
(beta2 0.95, in-order windows) for comparison, each scored on the whole val split. Left as
they are: GPT-2's biases (nanoGPT trains without) and a 256-byte vocabulary (65 characters).

Runs go to a new folder under ``--log_root`` (nothing is replaced); the table, curves and
commands go to ``--out``/nanogpt-shakespeare.{json,md,png}: by default a folder in the user's
cache (benchmarks/results_dir.py), since ``--out benchmarks/results`` replaces the committed one.

matplotlib is imported where the curves are drawn: slow to import, and --help needs none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from nanomoe.text_corpus import CORPUS_FILE

from .results_dir import default_out, where_note

NANOGPT_VAL_LOSS = 1.886  # nanoGPT at this size, same text and steps (issue 15's measurement)
SIZE = ["--model", "gpt", "--tokenizer", "byte", "--n_layer", "4", "--n_head", "4",
        "--n_embd", "128", "--block_size", "64", "--B", "12", "--T", "64",
        "--total_batch_size", "768", "--warmup_steps", "100", "--max_lr", "1e-3",
        "--min_lr", "1e-4", "--eval_steps", "all", "--sample_tokens", "200",
        "--sample_prompt", "ROMEO:"]
RECIPES = {"nanogpt": ["--beta2", "0.99", "--data_order", "random"],
           "original": ["--beta2", "0.95", "--data_order", "sequential"]}
RUNS = ("jax-nanogpt", "torch-nanogpt", "jax-original")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = CORPUS_FILE  # tiny Shakespeare, shipped as train.py's default corpus


def command(run: str, data: str, steps: int, log_dir: str) -> list[str]:
    framework, recipe = run.split("-")
    return ["python", "train.py", "--framework", framework, "--data", data, *SIZE,
            "--max_steps", str(steps), "--eval_interval", str(max(1, steps // 8)),
            *RECIPES[recipe], "--log_dir", log_dir]


def summarise(run: str, cmd: list[str], log_dir: str) -> dict:
    records = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    dts = np.array([r["dt_ms"] for r in records if "dt_ms" in r][10:] or [np.nan])
    return {"run": run, "command": " ".join(cmd), "val_curve": evals,
            "val_loss": evals[-1][1],
            "val_tokens": next(r["val_tokens"] for r in reversed(records) if "val_loss" in r),
            "step_ms_median": float(np.median(dts)), "step_ms_p10": float(np.percentile(dts, 10))}


def table(results: list[dict]) -> str:
    lines = ["| run | val loss at the last step | vs nanoGPT 1.886 | step ms (median / p10) |",
             "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['val_loss']:.4f} | {r['val_loss'] - NANOGPT_VAL_LOSS:+.4f} "
                     f"| {r['step_ms_median']:.0f} / {r['step_ms_p10']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, losses = zip(*r["val_curve"][1:]) if len(r["val_curve"]) > 1 else ([], [])
        jax = r["run"].startswith("jax")  # drawn wide, so torch's curve on top of it shows
        ax.plot(steps, losses, marker="o", lw=4 if jax else 1.5, ls="-" if jax else "--",
                alpha=0.6 if jax else 1.0, label=r["run"])
    ax.axhline(NANOGPT_VAL_LOSS, color="k", ls="--", lw=1, label="nanoGPT (1.886)")
    ax.set(xlabel="step", ylabel="val loss (whole val split)",
           title="GPT 4x128 on tiny Shakespeare, B=12 T=64")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tiny Shakespeare as a .txt file")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list among {', '.join(RUNS)}")
    p.add_argument("--log_root", default=None, help="where the runs' folders go (default: a new "
                   "temporary folder)")
    p.add_argument("--out", default=None, help="folder for nanogpt-shakespeare.{json,md,png} "
                   "(default: $NANOMOE_RESULTS or ~/.cache/nanomoe/results; --out "
                   "benchmarks/results replaces the committed result)")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if not os.path.isfile(args.data) or any(r not in RUNS for r in runs) or args.steps < 1:
        print(f"error: --data must be a .txt file (got {args.data}), --runs among {RUNS}, "
              "--steps >= 1", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="recipe-", dir=args.log_root)
    results = []
    for run in runs:
        log_dir = os.path.join(root, run)
        cmd = command(run, args.data, args.steps, log_dir)
        print(f"== {run}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT).returncode
        if rc:
            print(f"error: the {run} run stopped with exit code {rc} (its message is above)",
                  file=sys.stderr)
            return rc
        results.append(summarise(run, cmd, log_dir))
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "nanogpt-shakespeare"
    json.dump({"nanogpt_val_loss": NANOGPT_VAL_LOSS, "steps": args.steps, "runs": results},
              open(f"{stem}.json", "w"), indent=1)
    text = table(results)
    Path(f"{stem}.md").write_text(
        "# nanoGPT's Shakespeare quick start, reproduced\n\n" + text + "\n\nCommands:\n\n"
        + "\n".join(f"    {r['command']}" for r in results) + "\n")
    plot(results, Path(f"{stem}.png"))
    print(text + f"\nwrote {stem}.json, .md, .png (runs in {root})")
    print(where_note(out, chosen=args.out is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
