"""The GPUs the plan compiles for: an XLA ``GpuTargetConfigProto`` per card (in
``benchmarks/targets/``), plus the figures the compiler does not need but the plan reports
(dense bf16 peak, the memory budget to plan against).

jax is imported where a device is needed: reading the targets (the plan's --help, its bad-input
errors) imports none."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TARGET_DIR = Path(__file__).parent / "targets"
GiB = 2 ** 30


@dataclass(frozen=True)
class Target:
    name: str
    proto_text: str
    device_kind: str  # what the device reports (device_description_str)
    memory_bytes: int  # the card's memory
    budget_bytes: int  # what a step may plan to use: the CUDA context, cuDNN/cuBLAS
    #                    workspaces and fragmentation take the rest
    bandwidth: float  # bytes/s
    peak_bf16: float  # dense tensor-core FLOP/s, datasheet


# datasheet dense bf16 peaks and planning budgets (about 2 GiB left for the runtime)
_EXTRA = {
    "rtx4090": dict(peak_bf16=165e12, budget_bytes=22 * GiB),
    "h100": dict(peak_bf16=989e12, budget_bytes=77 * GiB),
    "a100": dict(peak_bf16=312e12, budget_bytes=78 * GiB),
}
TARGETS = tuple(_EXTRA)


def _field(text: str, name: str) -> str:
    m = re.search(rf"^\s*{name}:\s*(\S+)", text, re.M)
    if not m:
        raise ValueError(f"target proto has no {name}")
    return m.group(1).strip('"')


def load_target(name: str) -> Target:
    if name not in _EXTRA:
        raise ValueError(f"--target {name!r} is unknown; choose one of {', '.join(TARGETS)}")
    text = (TARGET_DIR / f"{name}.textproto").read_text()
    kind = re.search(r'device_description_str:\s*"([^"]+)"', text).group(1)
    return Target(name=name, proto_text=text, device_kind=kind,
                  memory_bytes=int(_field(text, "device_memory_size")),
                  bandwidth=float(_field(text, "memory_bandwidth")), **_EXTRA[name])


def target_for_device(device) -> Target | None:
    """The target whose card a real device is (for its peak and budget), if one is."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for name in TARGETS:
        t = load_target(name)
        if t.device_kind.lower().split(" 80gb")[0] in kind:
            return t
    return None


def compile_devices(target: Target):
    """Devices to compile for: the real GPU when this machine has one, else one compile-only
    device of the target's topology (needs the CUDA plugin, ``pip install -e ".[plan]"``;
    run with JAX_PLATFORMS=cpu so the plugin does not look for a driver)."""
    import jax

    if jax.default_backend() == "gpu":
        return jax.devices()[:1], "real device"
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.proto_text,
                                            topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin is missing or refuses the proto
        raise RuntimeError(
            f"cannot describe a {target.device_kind} without the CUDA plugin ({e}); install "
            "the plan's extra (pip install -e \".[plan]\") and run with JAX_PLATFORMS=cpu"
        ) from None
    return list(topo.devices)[:1], "compile-only (deviceless)"
