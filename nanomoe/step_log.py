"""Each training step's metrics, read one step late (the device already runs the next step),
logged with time, throughput and MFU; steps the backend refused as non-finite are counted and
stop the run past --skip_nonfinite.

The first step a process runs also pays for compiling (JAX: the step and the eval, tens of
seconds on a CPU) and for the step-0 eval; extrapolated, it predicted hours for a 3-minute run.
So its progress line says so and shows that time once, and the ETA comes only from the steps
after it (StepTimer). Tests drive it with a fake clock through CLOCK.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import NonFiniteError
from .failures import nonfinite_message, nonfinite_weights_message

# What StepLog reads the time from; a test replaces it with a fake clock.
CLOCK = time.monotonic


class StepTimer:
    """Step times, and an ETA from the steps after the first one this process ran.

    The ETA is the mean time per step since the end of that first step, times the steps left:
    a mean (not the last step's time) so the periodic evals and checkpoints, which land inside
    some steps' times, count in proportion once one has been seen. It counts down to the last
    step; the final eval, export and sample come after it.
    """

    def __init__(self, clock=None):
        self.clock = clock or CLOCK
        self.t_last = self.clock()
        self.t_first_done: float | None = None  # when the first step's metrics were read
        self.after_first = 0  # steps timed since then

    def tick(self) -> tuple[float, bool]:
        """Seconds since the previous step was read, and whether this was the first step."""
        now = self.clock()
        dt, self.t_last = now - self.t_last, now
        if self.t_first_done is None:
            self.t_first_done = now
            return dt, True
        self.after_first += 1
        return dt, False

    def eta(self, steps_left: int) -> float | None:
        """Seconds left for steps_left more steps; None until a step after the first is timed."""
        if not self.after_first:
            return None
        return (self.t_last - self.t_first_done) / self.after_first * steps_left


class StepLog:
    """The loop hands it each step's handle (``submit``) and each checkpoint it saved
    (``saved``); it reads and logs the metrics one step late, and stops the run past
    --skip_nonfinite non-finite steps, naming the last checkpoint saved."""

    def __init__(self, args, backend, logger, losses: dict, start_step: int,
                 flops_per_step: float, peak: float | None):
        self._args, self._backend, self._logger, self._losses = args, backend, logger, losses
        self._flops_per_step, self._peak = flops_per_step, peak
        self._pending: tuple[int, Any, float] | None = None  # (step, handle, lr) not yet read
        self._timer = StepTimer()
        # jax compiles the step at its first call; torch on CPU runs eagerly (the first step
        # only warms caches), on CUDA through torch.compile
        compiles = backend.name == "jax" or getattr(backend, "has_accelerator", False)
        self._first_label = "compiling" if compiles else "first step"
        self._skipped = 0
        self._last_good = f"step {start_step} in {args.log_dir}" if start_step else None

    def submit(self, step: int, handle: Any, lr: float) -> None:
        """Step ``step`` was dispatched: log the previous step's metrics now (the device
        already works on this one), this one's at the next call, or now if it already ran."""
        self.flush()
        self._pending = (step, handle, lr)
        if not self._backend.async_dispatch:
            self.flush()  # the step ran to completion inside train_step

    def saved(self, done: int, log_dir: str) -> None:
        """The checkpoint after ``done`` steps is written: the one a non-finite stop names."""
        self._last_good = f"step {done} in {log_dir}"

    def flush(self) -> None:
        """Read and log the pending step's metrics, if any."""
        if self._pending is None:
            return
        step, handle, lr = self._pending
        self._pending = None
        args = self._args
        metrics = self._backend.fetch(handle)
        if metrics.pop("nonfinite_weights", 0.0):  # applied and not finite: nothing to skip
            raise NonFiniteError(nonfinite_weights_message(step, lr, self._last_good))
        if metrics.get("skipped"):
            self._skipped += 1
            if self._skipped > args.skip_nonfinite:
                raise NonFiniteError(nonfinite_message(step, metrics, lr, self._last_good))
            print(f"step {step}: non-finite loss or gradient, step skipped "
                  f"({self._skipped}/{args.skip_nonfinite})", flush=True)
        metrics["skipped_steps"] = self._skipped
        dt, first = self._timer.tick()
        record = {"step": step, **metrics, "lr": lr, "dt_ms": 1000 * dt,
                  "tokens_per_sec": args.total_batch_size / dt}
        if self._peak:
            record["mfu"] = self._flops_per_step / dt / self._peak
        self._losses[step] = metrics["loss"]
        self._logger.log(record)
        self._logger.progress(record, eta=self._timer.eta(args.max_steps - step - 1),
                              first=self._first_label if first else None)
