"""Each training step's metrics, read one step late (the device already runs the next step),
logged with time, throughput and MFU; steps the backend refused as non-finite are counted and
stop the run past --skip_nonfinite."""

from __future__ import annotations

import time
from typing import Any

from .errors import NonFiniteError


class StepLog:
    def __init__(self, args, backend, logger, losses: dict, start_step: int,
                 flops_per_step: float, peak: float | None):
        self.args, self.backend, self.logger, self.losses = args, backend, logger, losses
        self.flops_per_step, self.peak = flops_per_step, peak
        self.pending: tuple[int, Any, float] | None = None  # (step, handle, lr) not yet read
        self.t_last = time.time()
        self.skipped = 0
        self.last_good = f"step {start_step} in {args.log_dir}" if start_step else None

    def flush(self) -> None:
        """Read and log the pending step's metrics, if any."""
        if self.pending is None:
            return
        step, handle, lr = self.pending
        self.pending = None
        args = self.args
        metrics = self.backend.fetch(handle)
        if metrics.get("skipped"):
            self.skipped += 1
            if self.skipped > args.skip_nonfinite:
                raise NonFiniteError(
                    f"step {step}: the loss is {metrics['loss']:.4g} and the gradient norm "
                    f"{metrics['grad_norm']:.4g}, so the step was not applied; the last good "
                    f"checkpoint is {self.last_good or 'none (no checkpoint yet)'}: continue "
                    "from it with --resume, perhaps with a lower --max_lr, or allow bad steps "
                    "with --skip_nonfinite N")
            print(f"step {step}: non-finite loss or gradient, step skipped "
                  f"({self.skipped}/{args.skip_nonfinite})", flush=True)
        metrics["skipped_steps"] = self.skipped
        now = time.time()
        dt = now - self.t_last
        self.t_last = now
        record = {"step": step, **metrics, "lr": lr, "dt_ms": 1000 * dt,
                  "tokens_per_sec": args.total_batch_size / dt}
        if self.peak:
            record["mfu"] = self.flops_per_step / dt / self.peak
        self.losses[step] = metrics["loss"]
        self.logger.log(record)
        self.logger.progress(record)
