"""The device and the machine: names, versions, a matmul peak, step timing.

jax and torch are imported where used: a run imports only the frameworks it measures.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

def has_cuda() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def device_kind() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return "cpu"
    return getattr(d, "device_kind", d.platform)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS): the process high-water mark, not per cell.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def timed_steps(step, sync, n_warmup: int, n_steps: int) -> list[float]:
    """Wall time of each call, each followed by a device synchronisation."""
    times = []
    for _ in range(n_warmup + n_steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return times


def pipelined_steps(step, wait, n_steps: int) -> list[float]:
    """Step times as train.py runs its loop: each step is dispatched before the previous
    step's result is waited for (its metrics are read one step late), so the host's dispatch
    overlaps the device's work where a framework allows it (JAX; torch on CUDA). Time i is the
    dispatch of step i plus the wait for step i-1, i.e. the steady-state period; one step
    before the first is dispatched untimed and the last is waited for untimed."""
    times = []
    prev = step()
    for _ in range(n_steps):
        t0 = time.perf_counter()
        cur = step()
        wait(prev)
        times.append(time.perf_counter() - t0)
        prev = cur
    wait(prev)
    return times


def measure_matmul_peak(n: int, dtype: str, frameworks: tuple[str, ...], reps: int = 10) -> dict:
    """FLOP/s of a square (n x n) @ (n x n) matmul in the run's compute dtype (bf16 on a GPU),
    in each framework: what this device reaches on the friendliest possible kernel, an MFU
    denominator beside the datasheet's."""
    out: dict[str, float] = {}
    flop = 2.0 * n ** 3
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    mm = jax.jit(jnp.matmul)
    times = timed_steps(lambda: mm(a, b), jax.block_until_ready, 2, reps)[2:]
    out["jax"] = flop / float(np.median(times))
    if any(f.startswith("torch") for f in frameworks):
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tdt = getattr(torch, dtype)
        ta = torch.randn(n, n, device=dev, dtype=tdt)
        tb = torch.randn(n, n, device=dev, dtype=tdt)
        sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
        times = timed_steps(lambda: ta @ tb, sync, 2, reps)[2:]
        out["torch"] = flop / float(np.median(times))
        del ta, tb
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def environment() -> dict:
    """Versions and the device, for the report header."""
    import flax
    import jax
    import jaxlib
    import optax

    env: dict[str, Any] = {
        "python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "jax_backend": jax.default_backend(), "device": device_kind(),
        "device_count": jax.device_count(), "host": platform.node(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        # cores this process may use (taskset): CPU runs are pinned to keep them steady
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import jax.extend

        env["jax_platform_version"] = jax.extend.backend.get_backend().platform_version
    except Exception:  # pragma: no cover - private-ish API, informative only
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name()
            env["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        env["torch"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


