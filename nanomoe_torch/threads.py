"""How many threads torch uses on a CPU (train.py --framework torch, the torch sampler).

torch starts one OpenMP thread per core and every op ends at a barrier where all of them must
arrive; when other processes keep some of those cores busy, each barrier waits for a thread
that is not running, and a step takes 5-50x longer (issue 25: training steps 2.7-22 s instead
of 0.42 s, the sampler 179 s instead of 17.7 s with OMP_NUM_THREADS=1). JAX's thread pool does
not wait like that. So we give torch the cores that are idle when the run starts: the usable
cores (CPU affinity, shared among torchrun's local processes) less the 1-minute load average,
at least one. An explicit choice always wins: NANOMOE_TORCH_THREADS=N, or OMP_NUM_THREADS
(which torch reads itself).

The count can change the last bits of a torch CPU run (reductions split by thread); set
NANOMOE_TORCH_THREADS for bit-identical reruns on a machine whose load varies.
"""

from __future__ import annotations

import os
import sys

import torch

ENV = "NANOMOE_TORCH_THREADS"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # taskset / cgroup cpusets, unlike os.cpu_count
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def pick(env: dict, cores: int, load: float, local_processes: int = 1) -> tuple[int | None, str]:
    """(threads to set or None to leave torch's default, why)."""
    if env.get(ENV):
        try:
            n = int(env[ENV])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV} must be a whole number >= 1, got {env[ENV]!r}")
        return n, f"{ENV}={n}"
    if env.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS is set"
    share = max(1, cores // max(1, local_processes))
    idle = int(cores - load + 0.5)  # the cores other processes leave free, rounded
    n = max(1, min(share, idle))
    why = (f"{cores} usable cores" + (f" shared by {local_processes} processes"
                                      if local_processes > 1 else "")
           + f", load average {load:.1f}")
    return n, why


def choose_cpu_threads(stream=sys.stdout) -> int | None:
    """Set torch's thread count for a CPU run (nothing on CUDA); says so when it lowers it."""
    if torch.cuda.is_available():
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): assume a quiet machine
        load = 0.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    try:
        n, why = pick(os.environ, usable_cores(), load, local)
    except ValueError as e:
        print(f"note: {e}; torch keeps its default", file=stream, flush=True)
        return None
    if n is None:
        return None
    default = torch.get_num_threads()
    torch.set_num_threads(n)
    if n < default:
        print(f"torch: {n} CPU thread{'s' if n > 1 else ''} instead of {default} ({why}: "
              f"threads waiting for busy cores slow every op; {ENV}=N chooses)",
              file=stream, flush=True)
    return n
