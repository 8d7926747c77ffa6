"""How a model runs on a device: one function picks the execution :class:`Options`.

``execution_options(device, config)`` is used by ``train.py``, the benchmark
(``python -m benchmarks.bench``) and the GPU plan (``python -m benchmarks.plan``); keyword
overrides (the command-line flags) win over what it picks. ``device`` may be a real
``jax.Device`` or a compile-only one from ``jax.experimental.topologies`` (a GPU described by a
target proto, no GPU present): only ``platform``, ``device_kind`` and, where the runtime has
it, ``compute_capability`` are read.

What it picks, and why:

* ``dtype``: bf16 on GPUs and TPUs (tensor cores), fp32 on CPU (bf16 is emulated there).
* ``attention_impl``: ``"cudnn"`` (flash attention through ``jax.nn.dot_product_attention``:
  causal, never materialises the (B, heads, T, T) probabilities) on NVIDIA GPUs of compute
  capability >= 8.0 when the compute dtype is bf16/fp16 and the head size is one cuDNN's flash
  kernel accepts (a multiple of 8, at most 128); ``"custom_vjp"`` on CPU (``attention.py``:
  the same math with a backward written for one pass over the probabilities, ~3x faster than
  XLA's autodiff at T=256 on 2 cores); ``"xla"`` everywhere else (TPU, fp32, older or
  non-NVIDIA GPUs, other head sizes). Both keep the probabilities of every layer for the
  backward pass: ~10 GB for GPT-2 124M at B=16, T=1024.
* ``moe_dispatch``: ``"tokamax"`` (a grouped GEMM that reads each expert's weights once,
  ``ragged_gemm.py``) for MoeGPT on NVIDIA GPUs >= sm_80 without an expert mesh when tokamax
  imports and takes the shapes; ``"grouped"`` on other GPUs or when it refuses, with a note
  (:func:`execution_notes`, printed once by ``train.py``); the config's otherwise.
  ``shared_dense``: with ``"tokamax"``, the shared experts as one dense MLP where the
  grouped GEMMs are bandwidth-bound (Hopper at MoeGPT-64's sizes,
  :func:`shared_dense_pays`).
* ``remat="none"``, ``loss_chunk_tokens=8192``: the step fits the original's configs on a
  24 GB card with flash attention, so no recomputation is bought; nGPT on an accelerator
  takes ``remat="dots"`` where it scans its layers (:func:`default_remat`).
* ``scan_layers=False`` (the layers unrolled) up to ``UNROLL_MAX_LAYERS`` layers, on CPU and
  on one accelerator: a layer ``scan`` zero-fills, copies into and slices out of its stacked
  per-layer residuals every step. On CPU that was ~40 % of the quick-start step's kernel time
  (unrolled: 1.25-1.3x faster, benchmarks/NOTES.md "CPU quick start"); the GPU plan estimates
  the unrolled step 1.1-1.35x faster on the 4090 and H100 (planned peaks 2.1 GiB lower to 1.6
  GiB higher), for 3-5x the compile time (seconds deviceless). A mesh of several accelerators keeps the scan
  (``mesh_devices > 1``): unrolled, XLA schedules the layers' fsdp gathers and expert
  exchanges early and the planned peak per device rises (GPT data=8 8.4 -> 9.8 GiB, MoeGPT-64
  expert=8 12.0 -> 16.4 GiB). Compile time grows with the layer count, hence the cap.
* ``row_groups=2`` on CPU: the training loss of a micro-batch as two independent graphs of
  half its rows, which XLA's CPU runtime runs side by side (1.12x faster at the nanoGPT
  quick-start size on 2 cores; 3 and 4 groups were slower there). Same numbers
  (``nanomoe_jax/row_groups.py``); on accelerators one op already fills the device.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from nanomoe.config import nGPTConfig

from .gather_gemm import C_MULTIPLE, H_MULTIPLE, fits
from .layers import Options
from . import ragged_gemm

# compute capability by device_kind, for devices that do not report it (compile-only devices
# of a target topology); real CUDA devices carry ``compute_capability`` themselves
KNOWN_CC = {
    "H100": (9, 0), "H200": (9, 0), "H800": (9, 0), "GH200": (9, 0), "B200": (10, 0),
    "A100": (8, 0), "A800": (8, 0), "A10": (8, 6), "A40": (8, 6), "RTX 3090": (8, 6),
    "RTX 4090": (8, 9), "L40": (8, 9), "L4": (8, 9), "RTX 6000 Ada": (8, 9),
    "V100": (7, 0), "T4": (7, 5), "P100": (6, 0),
}
FLASH_MIN_CC = (8, 0)
FLASH_DTYPES = (jnp.bfloat16, jnp.float16)
FLASH_MAX_HEAD_DIM = 128
UNROLL_MAX_LAYERS = 12
CPU_ROW_GROUPS = 2


def compute_capability(device: Any) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU, None for anything else or an unknown card."""
    if getattr(device, "platform", None) not in ("gpu", "cuda"):
        return None
    cc = str(getattr(device, "compute_capability", "") or "")
    m = re.fullmatch(r"(\d+)\.(\d+)", cc)
    if m:  # a real CUDA device ("8.9"); ROCm devices report "gfx90a" and fall through
        return int(m.group(1)), int(m.group(2))
    kind = str(getattr(device, "device_kind", "")).lower()
    # longest name first: "A100" must not be read as "A10", "GH200" not as "H200"
    for name in sorted(KNOWN_CC, key=len, reverse=True):
        if name.lower() in kind:
            return KNOWN_CC[name]
    return None


def head_dim(config: Any) -> int | None:
    if config is None:
        return None
    return config.n_embd // config.n_head


def flash_attention_ok(device: Any, dtype: Any, config: Any = None) -> bool:
    """Whether cuDNN's flash attention compiles for this device, dtype and head size."""
    cc = compute_capability(device)
    if cc is None or cc < FLASH_MIN_CC:
        return False
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in FLASH_DTYPES]:
        return False
    hd = head_dim(config)
    return hd is None or (hd % 8 == 0 and hd <= FLASH_MAX_HEAD_DIM)


def default_compute_dtype(device: Any):
    return jnp.float32 if getattr(device, "platform", "cpu") == "cpu" else jnp.bfloat16


def tokamax_refusal(device: Any, config: Any, dtype: Any) -> str | None:
    """Why the tokamax dispatch cannot run this MoE on ``device`` (None: it can). Its Triton
    kernels (tokamax's and ours, ``gather_gemm.py``) need an NVIDIA GPU >= sm_80 (bf16 tensor
    cores), and widths their blocks divide."""

    cc = compute_capability(device)
    gpu = getattr(device, "platform", "cpu") in ("gpu", "cuda")
    if gpu and (cc is None or cc < FLASH_MIN_CC):
        return f"{getattr(device, 'device_kind', 'this GPU')} is not an NVIDIA GPU >= sm_80"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in (*FLASH_DTYPES, jnp.float32)]:
        return f"compute dtype {jnp.dtype(dtype).name}"
    C, H = getattr(config, "n_embd", 0), getattr(config, "expert_hidden", 0)
    if gpu and not fits(C, H):
        return (f"expert sizes {C} x {H} (n_embd x expert width) are not multiples of "
                f"{C_MULTIPLE} x {H_MULTIPLE}")
    return ragged_gemm.unavailable_reason()  # looked up here: tests stand in for it


def _moe_choice(device: Any, config: Any, given: dict,
                dtype: Any) -> tuple[str | None, str | None]:
    """(moe_dispatch, note). On an NVIDIA GPU MoeGPT's routed experts run as tokamax's grouped
    GEMM (each expert's weights read once per GEMM, the useful FLOPs plus 2 x 128 pad rows)
    when it takes the config, else as the ``grouped`` padded tiles (about 1.02x the useful
    FLOPs, each expert's weights read once per tile), instead of the config's ``capacity``
    buffer (1.14x-1.27x on the 4090 plan). On an expert-parallel mesh the rows travel to the
    devices holding their experts (expert_parallel.py, the capacity semantics either way);
    ``tokamax`` there runs each device's experts through the grouped GEMM, ``capacity`` as
    tiles. On CPU the config's choice stays (the tested paths; no FLOP budget to meet there). A ``tokamax``
    asked for where it refuses becomes ``grouped``, with the reason as the note. On a mesh
    each device runs the one-device program on its own slice (nanomoe_jax/replicas.py).
    None: the config decides."""
    asked = given.get("moe_dispatch")
    if getattr(config, "moe_dispatch", None) is None:
        return asked, None
    on_gpu = getattr(device, "platform", "cpu") in ("gpu", "cuda")
    want = asked or (config.moe_dispatch if not on_gpu else "tokamax")
    if want != "tokamax":
        return asked, None
    refusal = tokamax_refusal(device, config, dtype)
    if refusal is None:
        return "tokamax", None
    if given.get("expert_mesh") is not None:  # the exchange, its experts as tiles
        return "capacity", (f"each device's experts as padded tiles (their weights read per "
                            f"tile) instead of tokamax's grouped GEMM: {refusal}")
    return "grouped", (f"moe_dispatch=grouped (padded tiles, each expert's weights read per "
                       f"tile) instead of tokamax's grouped GEMM: {refusal}")


# dense bf16 FLOPs per byte of HBM where Hopper turns compute-bound (datasheets; its lowest
# part, the H200: 989 TFLOP/s / 4.8 TB/s)
HOPPER_RIDGE = 200


def shared_dense_pays(device: Any, config: Any) -> bool:
    """The tokamax dispatch's shared experts as one dense MLP (``shared_gemm.py``) where its
    grouped GEMMs are bandwidth-bound: a row of width C in and H out is C H / (C + H) FLOPs a
    byte, under Hopper's ridge for MoeGPT-64 (C 512, H 256: 171), where the H100 plan goes
    17.5 -> 17.0 ms a micro-batch. Elsewhere the split kernels planned 0.6-1 % slower (the
    4090, ridge 164; MoeGPT's H = 2048, 410: benchmarks/NOTES.md), so the groups stay."""
    cc = compute_capability(device)
    S = getattr(config, "n_shared", 0)
    if not S or cc is None or cc < (9, 0):
        return False
    C, H = config.n_embd, config.expert_hidden
    return C * H / (C + H) < HOPPER_RIDGE


def moe_dispatch(device: Any, config: Any, given: dict) -> str | None:
    """The MoE back end :func:`execution_options` picks (see :func:`_moe_choice`)."""
    dtype = given.get("dtype") or default_compute_dtype(device)
    return _moe_choice(device, config, given, dtype)[0]


def execution_notes(device: Any, config: Any = None, **overrides) -> list[str]:
    """What :func:`execution_options` had to choose against (one line each; ``train.py``
    prints them in its first lines): today, tokamax's grouped GEMM refused or not used."""
    given = {k: v for k, v in overrides.items() if v is not None}
    dtype = given.get("dtype") or default_compute_dtype(device)
    note = _moe_choice(device, config, given, dtype)[1]
    return [note] if note else []


def default_remat(device: Any, config: Any, scan_layers: bool = True) -> str:
    """``"dots"`` for nGPT on accelerators under a layer scan: its residual stream and
    normalisations are fp32 (the original's autocast promotes them), and the scan's stacks of
    every elementwise result planned 28 GiB at the 4090 config (B=16, T=1024), past the card;
    recomputing all but the matmuls plans 7 GiB. Unrolled, the same step keeps 10.7 GiB with
    no recomputation and runs 0.91x the time of "dots" (benchmarks/NOTES.md), so ``"none"``
    there, and everywhere else: the step fits."""
    on_cpu = getattr(device, "platform", "cpu") == "cpu"
    return "dots" if isinstance(config, nGPTConfig) and not on_cpu and scan_layers else "none"


def execution_options(device: Any, config: Any = None, mesh_devices: int = 1,
                      **overrides) -> Options:
    """The :class:`Options` a model of ``config`` runs with on ``device``, one of the
    ``mesh_devices`` of the run's mesh (see the module docstring). ``overrides``: any Options
    field; ``None``
    values are ignored, so command-line flags that default to None mean "let this function
    decide"."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in Options.__dataclass_fields__.values()})
    if unknown:
        raise TypeError(f"execution_options: unknown option(s) {unknown}")
    dtype = jnp.dtype(given.pop("dtype", None) or default_compute_dtype(device))
    cpu = getattr(device, "platform", "cpu") == "cpu"
    attention = ("cudnn" if flash_attention_ok(device, dtype, config)
                 else "custom_vjp" if cpu else "xla")
    n_layer = getattr(config, "n_layer", UNROLL_MAX_LAYERS + 1)
    scan = given.get("scan_layers", n_layer > UNROLL_MAX_LAYERS or (mesh_devices > 1 and not cpu))
    chosen = dict(dtype=dtype, attention_impl=attention, scan_layers=scan,
                  remat=default_remat(device, config, scan), loss_chunk_tokens=8192,
                  row_groups=CPU_ROW_GROUPS if cpu else 1)
    chosen.update(given)
    chosen["moe_dispatch"] = _moe_choice(device, config, given, dtype)[0]
    if "shared_dense" not in given:
        chosen["shared_dense"] = (chosen["moe_dispatch"] == "tokamax"
                                  and shared_dense_pays(device, config))
    return Options(**chosen)


def describe(opts: Options) -> str:
    """One line for logs and reports."""
    return (f"dtype={jnp.dtype(opts.dtype).name} attention={opts.attention_impl} "
            f"remat={opts.remat} scan_layers={opts.scan_layers} "
            f"loss_chunk_tokens={opts.loss_chunk_tokens}"
            + (f" moe_dispatch={opts.moe_dispatch}" if opts.moe_dispatch else "")
            + (" shared_dense=True" if opts.shared_dense else "")
            + (f" row_groups={opts.row_groups}" if opts.row_groups > 1 else ""))


def options_kwargs(opts: Options) -> dict:
    """``opts`` as the keyword arguments the models take (no deep copy: a mesh stays itself)."""
    return {name: getattr(opts, name) for name in Options.__dataclass_fields__}


__all__ = ["execution_options", "execution_notes", "options_kwargs", "flash_attention_ok",
           "compute_capability", "describe"]
