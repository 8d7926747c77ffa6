"""How a run meets failure: signals before the first step, memory that runs out, and
the one sentence (exit 2, no traceback) that every explainable error becomes."""

from __future__ import annotations

import math
import signal
import sys
import threading
from typing import Any

from .atomic import describe, write_advice
from .errors import NanoMoeError


class Interrupted(NanoMoeError):
    """SIGINT/SIGTERM before training started: nothing was written."""

    def __init__(self, signame: str, log_dir: str):
        super().__init__(f"stopped by {signame} before the first step; nothing was written to "
                         f"{log_dir}")
        self.signum = int(getattr(signal, signame))


def catch_stop_signals(caught: list[str] | None = None) -> tuple[list[str], Any]:
    """SIGINT/SIGTERM only set a flag (handlers live in the main thread): before the log
    folder is touched the run stops cleanly; after, the step in flight finishes and is saved.
    ``caught``: signals already noted by the caller (train.py notes them from its first line,
    so one that lands during the imports is neither lost nor a traceback)."""
    caught = [] if caught is None else caught
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(
                sig, lambda signum, frame: caught.append(signal.Signals(signum).name))

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return caught, restore


def nonfinite_message(step: int, metrics: dict, lr: float, last_good: str | None) -> str:
    """Why a step was refused, blaming what was really not finite (a finite loss and
    gradient mean the update overflowed: the learning rate), and advising --resume only
    when a checkpoint exists."""
    loss, norm = metrics.get("loss", float("nan")), metrics.get("grad_norm", float("nan"))
    if math.isfinite(loss) and math.isfinite(norm):
        what = (f"the loss {loss:.4g} and gradient norm {norm:.4g} are finite but the update "
                f"at learning rate {lr:.4g} is not, so the step was not applied")
        fix = "a lower --max_lr"
    else:
        what = (f"the loss is {loss:.4g} and the gradient norm {norm:.4g}, so the step was not "
                "applied")
        fix = "a lower --max_lr, or allow bad steps with --skip_nonfinite N"
    if last_good:
        return (f"step {step}: {what}; the last good checkpoint is {last_good}: continue from "
                f"it with --resume, perhaps with {fix}")
    return f"step {step}: {what}; no checkpoint was written yet: start again with {fix}"


def nonfinite_weights_message(step: int, lr: float, last_good: str | None) -> str:
    """A step whose loss, gradients and learning rate were finite but whose update overflowed
    the weights: the run cannot skip it (the new weights replaced the old on the device)."""
    what = (f"step {step}: the update at learning rate {lr:.4g} made the weights non-finite "
            "and the run stopped without saving them")
    if last_good:
        return (f"{what}; continue from the last good checkpoint, {last_good}, with --resume "
                "and a lower --max_lr")
    return f"{what}; no checkpoint was written yet: start again with a lower --max_lr"


def _out_of_memory(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "OutOfMemory" in text


def report(e: Exception, debug: bool) -> int:
    """The exit code for ``e`` after printing its one sentence; re-raises what it cannot
    explain (a bug), or everything with ``debug``."""
    if isinstance(e, Interrupted):
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    if debug:
        raise e
    if isinstance(e, NanoMoeError):
        print(f"error: {e}", file=sys.stderr)
    elif isinstance(e, OSError):  # a disk or permission failure outside the checkpoint writers
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {describe(e)}{where}; {write_advice(e)}", file=sys.stderr)
    elif _out_of_memory(e):
        print("error: out of memory; use a smaller --B (more accumulation keeps the batch), "
              "--T or model, or --remat full (JAX)", file=sys.stderr)
    else:
        raise e
    return 2
