"""Range checks on a model config built from the command line, and the memory it needs.

Config classes check what makes a config ill-formed (a zero head count, an odd head size);
this module checks what makes a well-formed config unbuildable or meaningless here, with the
same bounds as a config read back from a checkpoint (``config_from_dict``), so train.py never
writes a checkpoint that the sampler or the converters would then refuse. Everything here runs
before a file is written or an array allocated.
"""

from __future__ import annotations

import dataclasses
import resource

import numpy as np

from .config import config_from_dict, config_to_dict
from .errors import ConfigError
from .init import count_params

# Float fields: (lowest, highest, why). A RoPE base at or below 1 gives frequencies that do
# not fall with the pair index (at 1e-300 they overflow to inf), so positions lose meaning;
# the others scale activations, and values far past these turn every output into inf.
FLOAT_RANGES = {
    "rope_scaling": (1.0, 1e12, "the RoPE base (10000 by default; long-context models use "
                                "up to about 1e8)"),
    "route_scale": (0.0, 1e3, "a multiplier on the routed experts' output (1 by default)"),
    "moe_loss_weight": (None, 1e3, "the balance loss weight (0.01 by default)"),
    "base_scale": (0.0, 1.0, "nGPT's init scale (1/sqrt(768) by default)"),
}
# Past this no token can be dropped anyway (capacity_factor >= routed experts / k suffices);
# far past it, capacity_factor * tokens overflows when the capacity is computed.
CAPACITY_FACTOR_MAX = 1e6


def check_config(config) -> None:
    """Raise ConfigError naming the flag when a field is out of the range this project builds."""
    for name, (low, high, what) in FLOAT_RANGES.items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if (low is not None and value <= low) or value > high:
            above = f"above {low} and " if low is not None else ""
            raise ConfigError(f"--{name} must be {above}at most {high:g}, got {value:g}: it is "
                              f"{what}")
    factor = getattr(config, "capacity_factor", None)
    if factor is not None and factor > CAPACITY_FACTOR_MAX:
        enough = config.n_routed_experts / config.n_activated_experts
        raise ConfigError(f"--capacity_factor must be at most {CAPACITY_FACTOR_MAX:g}, got "
                          f"{factor:g}; any value >= {enough:g} (routed experts / "
                          "n_activated_experts) already drops no token")
    try:  # the bounds a checkpoint's config is read with (block_size <= 2**20, ints < 2**31)
        config_from_dict(config_to_dict(config))
    except ConfigError as e:
        field, _, why = str(e).partition(": ")  # "n_layer: must be ..." -> "--n_layer must be"
        raise ConfigError(f"--{field} {why}") from None


def param_count(config) -> int:
    """Parameters of ``config`` (the tied matrix once), without listing every layer: the
    layers are identical, so two small configs give the per-layer and the fixed parts."""
    one = count_params(dataclasses.replace(config, n_layer=1))
    two = count_params(dataclasses.replace(config, n_layer=2))
    return one + (config.n_layer - 1) * (two - one)


def memory_parts(config, args, world: int = 1, device: bool = False) -> dict[str, int]:
    """Lower bounds, in bytes, on what one process (or, with ``device``, one device) holds:
    fp32 weights, gradients and the two AdamW moments (16 bytes a parameter, split over the
    devices when a --mesh may shard them; on the host also the copy they are initialised
    from), the residual stream each layer keeps for the backward pass (kept even with
    --remat full), and on the host the step's token batch (x and y, int32)."""
    parts = {"weights": 20 * param_count(config),
             "activations": 4 * args.B * args.T * config.n_embd * config.n_layer,
             "batch": 8 * args.total_batch_size // max(world, 1)}
    if device:
        shards = world if getattr(args, "mesh", None) else 1
        parts.update(weights=16 * param_count(config) // shards, batch=0)
    return parts


# What to shrink when a part is the largest.
SHRINK = {"weights": "a smaller model (--n_layer, --n_embd, --n_experts, --vocab_size, "
                     "--expert_dim, --ffn_factor)",
          "activations": "a smaller --B or --T (more accumulation keeps the batch)",
          "batch": "a smaller --total_batch_size"}


def memory_need(config, args, world: int = 1, device: bool = False) -> int:
    return sum(memory_parts(config, args, world, device).values())


def available_memory() -> int | None:
    return host_memory()[0]


def host_memory() -> tuple[int | None, str]:
    """(bytes this process may still use, where): the kernel's MemAvailable, lowered by an
    address-space limit (ulimit -v) after what the runtime itself reserves."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    left = address_space_left()
    if left is not None and (free is None or left < free):
        return left, "under this shell's address-space limit (ulimit -v)"
    return free, "on this host"


def address_space_left() -> int | None:
    """What an address-space limit (ulimit -v) leaves past this process's current size (the
    runtime's own reservations included); None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        size = 0
    return max(0, int(soft) - size)


def check_memory(config, args, free: int | None, where: str, world: int = 1,
                 device: bool = False) -> None:
    """One sentence when the run cannot fit in ``free`` bytes (None: unknown, not checked)."""
    parts = memory_parts(config, args, world, device)
    need = sum(parts.values())
    if free is not None and need > free:
        largest = max(parts, key=parts.get)
        raise ConfigError(
            f"the run needs about {need / 2**30:.1f} GiB ({largest} the most: "
            f"{parts[largest] / 2**30:.1f} GiB; {param_count(config):,} parameters, B={args.B}, "
            f"T={args.T}, {args.total_batch_size:,} tokens a step), more than the "
            f"{free / 2**30:.1f} GiB of memory free {where}; use {SHRINK[largest]}")


def float32_finite(value: float) -> bool:
    """The learning rate reaches the device as float32: above ~3.4e38 it becomes inf."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))
