"""How a run meets failure: signals before the first step, memory that cannot suffice, and
the one sentence (exit 2, no traceback) that every explainable error becomes."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import numpy as np

from .atomic import describe, write_advice
from .errors import NanoMoeError
from .init import param_specs


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


def check_host_memory(config) -> None:
    """On a CPU host, refuse a model whose weights and AdamW state alone exceed the memory
    that is free, before allocating any of it (the OS would otherwise kill the run)."""
    need = 20 * sum(int(np.prod(s.shape)) for s in param_specs(config).values())
    free = available_memory()
    if free is not None and need > free:  # init copy, weights, 2 moments, gradients: fp32
        raise NanoMoeError(f"the model needs about {need / 2**30:.1f} GiB for its weights and "
                           f"optimizer state, more than the {free / 2**30:.1f} GiB of memory "
                           "free; use a smaller model (--n_layer, --n_embd, --n_experts)")


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
