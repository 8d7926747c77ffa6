"""What a run shows and leaves behind: a progress line, metrics.jsonl, loss.png, wandb.

wandb (optional) and matplotlib (slow to import) are imported where used: most runs need
neither.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _parse(line: str) -> dict | None:
    """A metrics line, or None for a blank or torn one (a run killed mid-write leaves its
    last line cut; that step comes after the checkpoint we resume from and is redone)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLogger:
    """Appends one JSON object per train step and per eval to ``log_dir/metrics.jsonl``.

    Train lines carry the step's index; eval lines the number of updates done. On resume from
    ``start_step`` (updates done) the lines of steps >= start_step, written after the checkpoint
    by the interrupted run, are dropped first, so each step appears exactly once.
    """

    def __init__(self, log_dir: str, max_steps: int, start_step: int = 0, *, use_wandb=False,
                 run_name: str | None = None, wandb_config: dict | None = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.plot_path = os.path.join(log_dir, "loss.png")
        self.max_steps, self.start_step = max_steps, start_step
        self.records: list[dict] = []
        self.wandb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if os.path.exists(self.path):
            # keep what the checkpoint we resume from had seen: steps before start_step
            with open(self.path) as f:
                kept = [r for r in map(_parse, f) if r is not None]
            self.records = [r for r in kept if r.get("step", 0) < start_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")
        if use_wandb:
            import wandb

            self.wandb = wandb.init(project="nano-moe", name=run_name, config=wandb_config,
                                    resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v)
                  for k, v in record.items()}
        self.records.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, record: dict[str, Any], eta: float | None = None,
                 first: str | None = None) -> None:
        """One line per step: step, loss, lr, then time, tokens/s, MFU (with a known device
        peak) and ETA; ``first`` instead names what the first step's time includes
        ("compiling"), shown once, since a rate or ETA extrapolated from it is wrong by 100x."""
        if not self.enabled:
            return
        parts = [f"step {record['step']:5d}/{self.max_steps}", f"loss {record['loss']:.4f}"]
        if "moe_loss" in record:
            parts.append(f"(ce {record['ce_loss']:.4f} moe {record['moe_loss']:.3f})")
        parts += [f"lr {record['lr']:.2e}", f"norm {record['grad_norm']:.3f}"]
        if first:
            parts.append(f"{first}: {record['dt_ms'] / 1000:.1f} s")
        else:
            parts += [f"{record['dt_ms']:.0f} ms", f"{record['tokens_per_sec']:,.0f} tok/s"]
            if record.get("mfu") is not None:
                parts.append(f"mfu {100 * record['mfu']:.1f}%")
            if eta is not None:
                parts.append(f"eta {_fmt_time(eta)}")
        print(" | ".join(parts), flush=True)

    def plot(self) -> None:
        """loss.png: train loss per step and validation loss per eval."""
        if not self.enabled:
            return
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r and "val_loss" not in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        if not train and not val:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        finite = [v for _, v in train + val if math.isfinite(v)]
        if finite and max(finite) / max(min(finite), 1e-9) > 10:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(self.plot_path + ".tmp.png", self.plot_path)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.wandb is not None:
                self.wandb.finish()


def say(message: str) -> None:
    print(message, file=sys.stderr if message.startswith("error") else sys.stdout, flush=True)
