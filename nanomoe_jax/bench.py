"""Training-throughput benchmark: JAX vs PyTorch on one device, and an MoE sweep.

    python -m nanomoe_jax.bench                       # tiny sizes on CPU, the original's on a GPU
    python -m nanomoe_jax.bench --preset original --models moegpt --experts none
    python -m nanomoe_jax.bench --hlo --models none --experts none   # the FLOPs/HLO check only
    python -m nanomoe_jax.bench --merge a.json b.json                 # one report from pieces

What one *cell* measures (one model x one framework, in this process, on device 0):

* ``jax``: ``nanomoe_jax.train.train_step`` (forward, backward, clip, AdamW, the finiteness
  guard) jitted with the state donated, compute in ``--dtype`` (bf16 on a GPU), params fp32.
* ``torch`` / ``torch-compile``: the original's step (autocast bf16, backward, clip, AdamW;
  fused AdamW on CUDA), the model eager or wrapped in ``torch.compile`` as the original does.

Batches are random tokens already on the device, so host input is not measured. Each step is
followed by a device synchronisation; tokens/s is B*T over the median of the timed steps.
MFU uses ``nanomoe.flops.flops_per_token`` (6 N_active + 12 L C T) against two peaks: a square
matmul in the compute dtype measured in the same run (8192^3 bf16 on a GPU), and the bf16
datasheet value where the device is known (``nanomoe.flops.PEAK_BF16``). Peak memory: JAX's
``peak_bytes_in_use`` or XLA's ``memory_analysis`` of the step, torch's
``max_memory_allocated``; on CPU the process's max RSS (a high-water mark, labelled so).
Compile time: JAX lower + compile of the step; torch.compile the first step minus a median one.

The MoE sweep holds the active compute per token fixed while the routed-expert count E grows
(see :func:`sweep_point`), for each JAX dispatch back end and the original's all-experts
PyTorch math, plus a "ceiling": the same model with every routed expert active (E = k), i.e. a
dense model with exactly the active parameters and no dispatch.

``--hlo`` compiles the MoE train step at two expert counts and lists every op of the optimised
HLO whose size grows with E, other than the expert weights (and their gradients and optimizer
moments) and the router's (N, E) arrays; it also prints XLA's FLOP count
(``compiled.cost_analysis()``) per back end and E. This checks "FLOPs grow with k, not E"
without a GPU.

Results go to ``<out>/<device>-<date>.json``, ``.md`` and ``.png`` (tokens/s against E).
"""

from __future__ import annotations

import os

# torch shares the device: JAX must not grab 75 % of the GPU memory when it starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from nanomoe.config import (GPTConfig, ModernGPTConfig, MoeGPTConfig,  # noqa: E402
                            config_from_dict, config_to_dict)
from nanomoe.flops import active_params, device_peak_flops, flops_per_token  # noqa: E402
from nanomoe.init import param_specs, tied_names  # noqa: E402

FRAMEWORKS = ("jax", "torch", "torch-compile")
BACKENDS = ("dense", "capacity", "ragged")
MODELS = ("gpt", "moderngpt", "moegpt")
RESULT_TAG = "@@BENCH_RESULT@@"  # marks the result line of an --isolate child process
LR = 1e-4  # any small constant: the schedule does not change the cost of a step

# --fast-compile (CPU smoke tests): no LLVM optimisation and the older loop-fusion emitters,
# compiles ~4x faster, steps slower. HLO passes still run, so the HLO check is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


# ----------------------------------------------------------------------------- configurations

@dataclasses.dataclass(frozen=True)
class Preset:
    B: int
    T: int
    steps: int
    warmup: int
    experts: tuple[int, ...]
    shape: dict  # overrides of every model's size fields; {} = the original's sizes
    matmul_n: int  # side of the square bf16 matmul that measures the peak


PRESETS = {
    "original": Preset(B=16, T=1024, steps=20, warmup=3, experts=(4, 8, 16, 32, 64), shape={},
                       matmul_n=8192),
    "tiny": Preset(B=2, T=64, steps=5, warmup=2, experts=(4, 8, 16),
                   shape=dict(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=256),
                   matmul_n=512),
}


def model_configs(preset: Preset, overrides: dict | None = None) -> dict[str, Any]:
    """The three models at the original's training defaults (vocab padded to 50304, as its
    train.py builds them), or at the preset's tiny shape; ``overrides`` (``--set``) last."""
    s = {**preset.shape, **(overrides or {})}
    vocab = s.get("vocab_size", 50304)
    return {
        "gpt": GPTConfig(**{**s, "vocab_size": vocab}),
        "moderngpt": ModernGPTConfig(**{**s, "vocab_size": vocab}, n_kv_head=1),
        "moegpt": MoeGPTConfig(**s),
    }


def sweep_point(base: MoeGPTConfig, E: int, mode: str, E0: int, shared: int = 1,
                capacity_factor: float = 1.25) -> MoeGPTConfig:
    """The MoE with ``E`` routed experts (plus ``shared`` shared ones) at the active compute of
    the base config (k0 = base top-k, H0 = base expert width).

    * ``fixed``: k = k0 and H = H0 for every E. The active expert parameters per token are
      exactly constant (only the router's C x E matrix grows: 0.2 % of the active parameters
      at E = 64, original size); total expert parameters grow with E. This is the sweep that
      tests whether a back end's cost grows with k (it should not move) or with E (dense does).
    * ``fine``: fine-grained experts, k = k0 * E / E0 and H = H0 * E0 / E (E0 = the first E of
      the sweep), so k * H, the routed active width, is constant. The shared expert has the
      same width H (one ``expert_dim`` for all experts), so the active width (S + k) * H
      shrinks slightly as H does; the table reports each point's own active parameters.
    """
    k0, H0 = base.n_activated_experts, base.expert_hidden
    if mode == "fixed":
        k, H = k0, H0
    elif mode == "fine":
        if (k0 * E) % E0 or (H0 * E0) % E:
            raise ValueError(f"--sweep-mode fine: E={E} must give integer k = {k0}*{E}/{E0} "
                             f"and H = {H0}*{E0}/{E}")
        k, H = k0 * E // E0, H0 * E0 // E
    else:
        raise ValueError(f"sweep mode must be 'fixed' or 'fine', got {mode!r}")
    if k > E:
        raise ValueError(f"E={E} routed experts cannot hold top-k={k}")
    return dataclasses.replace(base, n_experts=E + shared, m_sub_experts=1,
                               n_shared_experts=shared, n_activated_experts=k, expert_dim=H,
                               capacity_factor=capacity_factor)


def ceiling_point(point: MoeGPTConfig) -> MoeGPTConfig:
    """The same model with every routed expert active (E = k): a dense feed-forward of exactly
    the active width (S + k) * H, same attention, same router. Under the ``dense`` dispatch it
    runs those S + k experts on every token with no sorting or gathering: the throughput a
    perfect sparse dispatch of ``point`` would reach."""
    k = point.n_activated_experts
    return dataclasses.replace(point, n_experts=point.n_shared + k, n_activated_experts=k)


def total_params(config) -> int:
    """Parameters stored (the tied output matrix once)."""
    lm_head, _ = tied_names(config)
    return int(sum(np.prod(s.shape) for n, s in param_specs(config).items() if n != lm_head))


# ----------------------------------------------------------------------------- device helpers

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


# ----------------------------------------------------------------------------- one cell

def run_cell(spec: dict) -> dict:
    """Time one (config, framework) training step; never raises (an OOM is a result too)."""
    config = config_from_dict(spec["config"])
    out = dict(spec["labels"], framework=spec["framework"],
               params_total=total_params(config), params_active=active_params(config),
               flops_per_token=flops_per_token(config, spec["T"]))
    try:
        runner = run_jax if spec["framework"] == "jax" else run_torch
        out.update(runner(config, spec))
        times = out.pop("times")
        timed = times[spec["warmup"]:]
        step_s = float(np.median(timed))
        out.update(step_s=step_s, tokens_per_s=spec["B"] * spec["T"] / step_s,
                   first_step_s=times[0], step_s_all=times)
        if spec["framework"] == "torch-compile":
            # The first call traces and compiles forward and backward; the rest is one step.
            out["compile_s"] = max(0.0, times[0] - step_s)
    except Exception as e:  # noqa: BLE001 - report and go on with the next cell
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        out["error"] = "OOM" if _is_oom(msg) else msg
        print(f"    ! {out['error']}", file=sys.stderr)
    finally:
        _free_memory(spec["framework"])
    return out


def _is_oom(msg: str) -> bool:
    return any(s in msg for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory"))


def _free_memory(framework: str) -> None:
    # The AOT-compiled JAX step is not in jit's cache: dropping the last reference (done by
    # the caller) frees it and its buffers. torch keeps memory in its caching allocator.
    gc.collect()
    if framework != "jax":
        import torch

        if framework == "torch-compile":
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def jax_train_step(config, spec: dict):
    """(compiled step, lowering seconds, compile seconds, state, lr_mult, batch) of one config.

    The step is the project's own ``train_step`` with one micro-batch (x of shape (1, B, T)),
    jitted with the (params, opt_state) argument donated as the JAX backend does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from . import create_model
    from .train import make_optimizer, train_step

    o = spec["jax_options"]
    model = create_model(config, spec.get("seed"), dtype=jnp.dtype(spec["dtype"]),
                         scan_layers=o["scan_layers"], remat=o["remat"],
                         attention_impl=o["attention_impl"],
                         loss_chunk_tokens=o["loss_chunk_tokens"])
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    tx = make_optimizer(config, params)
    lr_mult = jax.tree.map(lambda _: 1.0, params)
    state = (params, tx.init(params))
    x = jax.random.randint(jax.random.key(0), (1, spec["B"], spec["T"]), 0, config.vocab_size)
    y = jnp.roll(x, -1, axis=-1)
    lr = jnp.float32(LR)
    step = jax.jit(partial(train_step, graphdef, tx), donate_argnums=(1,))
    t0 = time.perf_counter()
    lowered = step.lower(lr_mult, state, x, y, lr)
    t1 = time.perf_counter()
    compiled = lowered.compile(o.get("compiler_options") or None)
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1, state, lr_mult, (x, y, lr)


def run_jax(config, spec: dict) -> dict:
    import jax

    device = jax.devices()[0]
    stats0 = device.memory_stats() or {}
    compiled, lower_s, compile_s, state, lr_mult, (x, y, lr) = jax_train_step(config, spec)
    res: dict[str, Any] = {"lower_s": lower_s, "compile_s": lower_s + compile_s}
    mem = compiled.memory_analysis()
    if mem is not None:
        # What XLA planned for this program: live arguments + outputs (donated ones counted
        # once) + temporaries. Per cell, unlike the process-wide high-water marks.
        res["xla_mem_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    box = {"state": state, "metrics": None}

    def step():
        box["state"], box["metrics"] = compiled(lr_mult, box["state"], x, y, lr)
        return box["state"], box["metrics"]

    res["times"] = timed_steps(step, jax.block_until_ready, spec["warmup"], spec["steps"])
    metrics = jax.device_get(box["metrics"])
    res["loss"] = float(metrics["loss"])
    if "dropped_fraction" in metrics:
        res["dropped_fraction"] = float(metrics["dropped_fraction"])
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak, before = stats["peak_bytes_in_use"], stats0.get("peak_bytes_in_use", 0)
        # The allocator's peak is a process high-water mark: it belongs to this cell only if
        # it rose during it (always so with --isolate).
        if peak > before or spec.get("isolated"):
            res.update(peak_mem_bytes=int(peak), peak_mem_source="jax peak_bytes_in_use")
        elif "xla_mem_bytes" in res:
            res.update(peak_mem_bytes=res["xla_mem_bytes"], peak_mem_source="xla memory_analysis")
    else:
        res.update(peak_mem_bytes=max_rss_bytes(), peak_mem_source="process max RSS")
    del box, state
    return res


def run_torch(config, spec: dict) -> dict:
    from contextlib import nullcontext

    import torch

    import nanomoe_torch
    from nanomoe_torch.train import make_optimizer

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = nanomoe_torch.create_model(config, spec.get("seed")).to(dev)
    model.train()
    optimizer = make_optimizer(model, config, 1.0, fused=cuda)
    for group in optimizer.param_groups:
        group["lr"] = LR * group["lr_mult"]
    forward = torch.compile(model) if spec["framework"] == "torch-compile" else model
    autocast = (torch.autocast(device_type=dev, dtype=torch.bfloat16)
                if spec["dtype"] == "bfloat16" else nullcontext())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (spec["B"], spec["T"]), generator=g).to(dev)
    y = torch.roll(x, -1, dims=-1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        # The original's step: autocast forward and loss, backward, clip to 1.0, AdamW.
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            _, losses = forward(x, y)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return losses["loss"]

    box = {}

    def run():
        box["loss"] = step()
        return box["loss"]

    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    res: dict[str, Any] = {"times": timed_steps(run, sync, spec["warmup"], spec["steps"])}
    res["loss"] = float(box["loss"].detach())
    if cuda:
        res.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()),
                   peak_mem_source="torch max_memory_allocated")
    else:
        res.update(peak_mem_bytes=max_rss_bytes(), peak_mem_source="process max RSS")
    del model, optimizer, forward, box
    return res


def run_isolated(spec: dict) -> dict:
    """The cell in a fresh Python process: exact per-cell peak memory, and an OOM or a CUDA
    error there cannot poison the cells after it."""
    cmd = [sys.executable, "-m", "nanomoe_jax.bench", "--_cell", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(spec["labels"], framework=spec["framework"],
                error=f"child process exited {proc.returncode}: {tail[0][:300]}")


# ----------------------------------------------------------------------------- HLO / FLOPs check

_SHAPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")


def hlo_shapes(hlo_text: str) -> Counter:
    """(dtype, dims) of every value an instruction of the optimised HLO produces (fusion
    parameters and computation roots included), counted."""
    shapes: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        rhs = m.group(1)
        # The result type is everything before the opcode: "f32[2,3]{1,0} dot(" or a tuple.
        if rhs.startswith("("):
            depth, end = 0, 0
            for i, ch in enumerate(rhs):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    end = i
                    break
            result = rhs[: end + 1]
        else:
            result = rhs.split(" ", 1)[0]
        for dtype, dims in _SHAPE.findall(result):
            shapes[(dtype, tuple(int(d) for d in dims.split(",") if d))] += 1
    return shapes


def _symbols(config: MoeGPTConfig, n_tokens: int) -> dict[int, str]:
    """Dimension sizes that depend on E for this config: E, R = E - S, the capacity slots P,
    and their products with the fixed sizes (XLA flattens (R, P, C) to (R*P, C) and the like)."""
    E, R, H, C = config.n_total_experts, config.n_routed_experts, config.expert_hidden, \
        config.n_embd
    syms = {E: "E", R: "R"}
    if config.moe_dispatch == "capacity":
        P = config.capacity(n_tokens)
        syms.setdefault(P, "P")
        syms.setdefault(R * P, "R*P")
    nk = n_tokens * config.n_activated_experts
    for name, v in (("E", E), ("R", R)):
        for fname, f in (("H", H), ("C", C), ("N", n_tokens), ("Nk", nk)):
            syms.setdefault(v * f, f"{name}*{fname}")
    return syms


def _allowed(canon: tuple, fixed: dict[str, int]) -> bool:
    """Expert weights/grads/moments (optionally stacked per layer), the router's arrays and
    O(E) bookkeeping: one expert axis (E or R), and the other axes (size-1 axes and one layer
    axis aside) one of (H, C), (H,), (C,), () for the weights, (N,), (B, T), (C,) for the
    router, or at most 4 L elements in all (per-layer counts and metrics)."""
    L, H, C, N, B, T = (fixed[k] for k in ("L", "H", "C", "N", "B", "T"))
    # a flattened (R*H) axis is an expert axis and an H axis
    expanded = []
    for d in canon:
        if isinstance(d, str) and "*" in d:
            letter, factor = d.split("*")
            expanded += [letter, {"H": H, "C": C, "N": N, "Nk": -1}[factor]]
        else:
            expanded.append(d)
    letters = [d for d in expanded if isinstance(d, str)]
    if letters not in (["E"], ["R"]):
        return False
    rest = sorted(d for d in expanded if not isinstance(d, str) and d != 1)
    if int(np.prod(rest)) <= 4 * L:
        return True
    allowed = [[], [C], [H], sorted([H, C]), [N], sorted([B, T])]
    without_layer = list(rest)
    if L in without_layer:
        without_layer.remove(L)
    return rest in allowed or without_layer in allowed


_COMPILED: dict[str, tuple[float, Counter]] = {}


def compiled_moe_step(config: MoeGPTConfig, B: int, T: int, dtype: str,
                      compiler_options: dict | None = None) -> tuple[float, Counter]:
    """(XLA FLOPs, HLO result shapes) of the compiled MoE train step, layers unrolled: XLA's
    cost analysis counts a ``while`` body (a scanned layer stack) once, so a scan would hide
    L - 1 layers. Cached, since the HLO check and the cost table share compilations."""
    key = json.dumps([config_to_dict(config), B, T, dtype, compiler_options], sort_keys=True)
    if key not in _COMPILED:
        spec = dict(B=B, T=T, dtype=dtype, seed=None,
                    jax_options=dict(scan_layers=False, remat="none", attention_impl=None,
                                     loss_chunk_tokens=B * T, compiler_options=compiler_options))
        compiled, *_ = jax_train_step(config, spec)
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):  # older jax: one dict per program
            ca = ca[0]
        _COMPILED[key] = (float(ca.get("flops", float("nan"))), hlo_shapes(compiled.as_text()))
    return _COMPILED[key]


def hlo_growth_check(base: MoeGPTConfig, B: int, T: int, experts: tuple[int, int],
                     dispatch: str = "capacity", dtype: str = "float32",
                     compiler_options: dict | None = None) -> dict:
    """Which ops of the compiled train step grow with E (at fixed k and H).

    Each shape of the two compilations is written symbolically (a dimension equal to E, E - S
    or, for ``capacity``, the slot count becomes a letter); a shape with letters grows if its
    size at the larger E exceeds 1.2x its size at the smaller. Growing shapes that are expert
    weights (E, H, C)-like or router (N, E)-like are expected; every other one is reported.
    Shapes that exist only at the larger E (fusion decisions changed) are listed separately."""
    e1, e2 = experts
    cfgs = [sweep_point(dataclasses.replace(base, moe_dispatch=dispatch), e, "fixed", e1)
            for e in (e1, e2)]
    N = B * T
    syms = [_symbols(c, N) for c in cfgs]
    # A product letter (R*H, ...) whose value is also a letter of the other compilation would
    # pair unrelated shapes: drop it (the single letters E, R, P are kept and checked below).
    for i in (0, 1):
        syms[i] = {v: n for v, n in syms[i].items()
                   if "*" not in n or v not in syms[1 - i]}
    shapes = [compiled_moe_step(c, B, T, dtype, compiler_options)[1] for c in cfgs]
    c0 = cfgs[0]
    fixed = dict(L=c0.n_layer, H=c0.expert_hidden, C=c0.n_embd, N=N, B=B, T=T)
    # A letter is only trustworthy if its size never appears where E cannot be involved,
    # i.e. in the other compilation (where that E-dependent size is different).
    collisions = sorted({v for i in (0, 1) for v in syms[i]
                         if any(v in dims for _, dims in shapes[1 - i])})

    def canon(dims, s):
        return tuple(s.get(d, d) for d in dims)

    def size(canon_dims, s):
        inv = {name: v for v, name in s.items()}
        return int(np.prod([inv.get(d, d) if isinstance(d, str) else d for d in canon_dims]))

    seen_small = {(dt, canon(d, syms[0])) for dt, d in shapes[0]}
    grows, allowed, unmatched = [], [], []
    for (dt, dims), count in shapes[1].items():
        cd = canon(dims, syms[1])
        row = {"dtype": dt, "shape": list(dims), "symbolic": [str(d) for d in cd],
               "count": count, "elements": int(np.prod(dims))}
        if (dt, cd) not in seen_small:
            unmatched.append(row)
            continue
        if not any(isinstance(d, str) for d in cd):
            continue
        row["growth"] = size(cd, syms[1]) / max(1, size(cd, syms[0]))
        if row["growth"] > 1.2:
            (allowed if _allowed(cd, fixed) else grows).append(row)
    # Shapes XLA only produced at the larger E: fusion or tiling decisions changed. Small ones
    # (at most 4 elements per expert, e.g. a cumsum over R padded to a power of two) are O(E)
    # bookkeeping; larger ones need a look and are reported with the growing ones.
    small = 4 * cfgs[1].n_total_experts
    by_size = lambda r: -r["elements"]  # noqa: E731
    return {
        "dispatch": dispatch, "experts": [e1, e2], "B": B, "T": T, "dtype": dtype,
        "symbols": [{str(v): k for v, k in s.items()} for s in syms],
        "collisions": collisions,
        "grows_with_E": sorted(grows, key=by_size),
        "expected_growth": sorted(allowed, key=by_size),
        "unmatched": sorted([r for r in unmatched if r["elements"] > small], key=by_size),
        "unmatched_small": sorted([r for r in unmatched if r["elements"] <= small], key=by_size),
    }


def cost_table(base: MoeGPTConfig, B: int, T: int, experts: tuple[int, ...],
               dispatches: tuple[str, ...], dtype: str = "float32",
               compiler_options: dict | None = None) -> list[dict]:
    """XLA's FLOP count of the whole compiled train step per (dispatch, E), at fixed k and H,
    beside the analytic 6 N_active + 12 L C T (times B*T) that MFU uses."""
    rows = []
    for dispatch in dispatches:
        for e in experts:
            c = sweep_point(dataclasses.replace(base, moe_dispatch=dispatch), e, "fixed",
                            experts[0])
            flops = compiled_moe_step(c, B, T, dtype, compiler_options)[0]
            rows.append({"dispatch": dispatch, "E": e, "k": c.n_activated_experts,
                         "H": c.expert_hidden, "xla_flops": flops,
                         "analytic_flops": flops_per_token(c, T) * B * T})
    for r in rows:
        first = next(x for x in rows if x["dispatch"] == r["dispatch"])
        r["vs_first_E"] = r["xla_flops"] / first["xla_flops"]
    return rows


# ----------------------------------------------------------------------------- the run

def build_cells(args, preset: Preset) -> list[dict]:
    """Every (config, framework) to time, torch first: on a shared GPU the caching allocator
    gives its memory back (empty_cache) while XLA's allocator keeps what it grew to."""
    configs = model_configs(preset, args.shape)
    jax_options = dict(scan_layers=args.scan_layers, remat=args.remat,
                       attention_impl=args.attention_impl,
                       loss_chunk_tokens=min(args.loss_chunk_tokens, args.B * args.T),
                       compiler_options=FAST_COMPILE if args.fast_compile else None)
    common = dict(B=args.B, T=args.T, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                  seed=args.seed, jax_options=jax_options, isolated=args.isolate)
    cells = []

    def add(config, framework, labels):
        cells.append(dict(common, config=config_to_dict(config), framework=framework,
                          labels=labels))

    for name in args.models:
        for fw in args.frameworks:
            cfg = configs[name]
            backend = cfg.moe_dispatch if (fw == "jax" and name == "moegpt") else None
            add(cfg, fw, dict(section="models", model=name, backend=backend))

    if args.experts:
        base = configs["moegpt"]
        points = [(E, sweep_point(base, E, args.sweep_mode, args.experts[0],
                                  capacity_factor=args.capacity_factor))
                  for E in args.experts]
        # in the fixed mode every point has the same ceiling: time it once
        ceilings = list({json.dumps(config_to_dict(ceiling_point(p))): ceiling_point(p)
                         for _, p in points}.values())
        if not args.ceiling:
            ceilings = []
        for kind, entries in (("sweep", points), ("ceiling", [(None, c) for c in ceilings])):
            for E, cfg in entries:
                labels = dict(section=kind, model="moegpt", E=E if E is not None else
                              cfg.n_routed_experts, k=cfg.n_activated_experts,
                              H=cfg.expert_hidden, S=cfg.n_shared)
                for fw in args.frameworks:
                    if fw == "jax":
                        for backend in args.backends:
                            add(dataclasses.replace(cfg, moe_dispatch=backend), fw,
                                dict(labels, backend=backend))
                    else:
                        add(cfg, fw, dict(labels, backend="all-experts"))
    order = {"torch": 0, "torch-compile": 1, "jax": 2}
    return sorted(cells, key=lambda c: order[c["framework"]])  # stable: keeps the rest in order


def _describe(spec: dict) -> str:
    lab = spec["labels"]
    return " ".join(str(x) for x in (lab["section"], lab["model"], spec["framework"],
                                     lab.get("backend") or "",
                                     f"E={lab['E']}" if "E" in lab else "") if x)


def add_mfu(results: list[dict], peak: dict) -> None:
    for r in results:
        if "tokens_per_s" not in r:
            continue
        achieved = r["flops_per_token"] * r["tokens_per_s"]
        r["model_tflops"] = achieved / 1e12
        r["mfu_measured"] = achieved / peak["measured"] if peak.get("measured") else None
        r["mfu_datasheet"] = achieved / peak["datasheet"] if peak.get("datasheet") else None


def run(args) -> dict:
    preset = PRESETS[args.preset]
    env = environment()
    print(f"device: {env['device']}  jax {env['jax']}  torch {env.get('torch')}  "
          f"preset {args.preset}  B={args.B} T={args.T} dtype={args.dtype}")
    report: dict[str, Any] = {
        "meta": {
            "command": "python -m nanomoe_jax.bench " + shlex.join(args.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "preset": args.preset, "overrides": args.shape, "B": args.B, "T": args.T,
            "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
            "isolate": args.isolate, "fast_compile": args.fast_compile,
            "jax_options": dict(scan_layers=args.scan_layers, remat=args.remat,
                                attention_impl=args.attention_impl,
                                loss_chunk_tokens=min(args.loss_chunk_tokens, args.B * args.T)),
            "sweep": dict(mode=args.sweep_mode, experts=list(args.experts), shared=1,
                          capacity_factor=args.capacity_factor, backends=list(args.backends)),
            "env": env,
        },
        "results": [], "hlo": None, "cost": None,
    }
    cells = build_cells(args, preset)
    if args.list:
        for spec in cells:
            c = config_from_dict(spec["config"])
            print(f"{_describe(spec):45s} params {total_params(c) / 1e6:8.1f}M  active "
                  f"{active_params(c) / 1e6:6.1f}M  {flops_per_token(c, args.T) / 1e6:8.1f} "
                  "MFLOP/token")
        return report
    if cells:
        peak = {"matmul_n": args.matmul_n, "matmul_dtype": args.dtype}
        peak.update({f"measured_{k}": v for k, v in measure_matmul_peak(
            args.matmul_n, args.dtype, tuple(args.frameworks)).items()})
        peak["measured"] = max(v for k, v in peak.items() if k.startswith("measured_"))
        peak["datasheet"] = device_peak_flops(env["device"]) if env["device"] != "cpu" else None
        report["meta"]["peak_flops"] = peak
        print(f"{args.dtype} matmul {args.matmul_n}^3: "
              + ", ".join(f"{k[9:]} {v / 1e12:.3g} TFLOP/s" for k, v in peak.items()
                          if k.startswith("measured_"))
              + (f"; datasheet {peak['datasheet'] / 1e12:.0f}" if peak["datasheet"] else ""))
    for i, spec in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {_describe(spec)}", flush=True)
        res = run_isolated(spec) if args.isolate else run_cell(spec)
        report["results"].append(res)
        if "tokens_per_s" in res:
            print(f"    {res['tokens_per_s']:,.0f} tok/s  step {1e3 * res['step_s']:.1f} ms"
                  + (f"  compile {res['compile_s']:.1f} s" if "compile_s" in res else ""),
                  flush=True)
    if cells:
        add_mfu(report["results"], report["meta"]["peak_flops"])
    if args.hlo:
        base = model_configs(PRESETS["tiny"], args.shape)["moegpt"]
        tb, tt = PRESETS["tiny"].B, PRESETS["tiny"].T
        opts = FAST_COMPILE if args.fast_compile else None
        print(f"HLO check: {', '.join(args.hlo_dispatches)} at E = {args.hlo_experts} "
              f"(tiny model, B={tb} T={tt})")
        report["hlo"] = [hlo_growth_check(base, tb, tt, tuple(args.hlo_experts), d,
                                          compiler_options=opts) for d in args.hlo_dispatches]
        print("cost analysis:", ", ".join(args.cost_dispatches), "at E =", args.cost_experts)
        report["cost"] = cost_table(base, tb, tt, tuple(args.cost_experts),
                                    tuple(args.cost_dispatches), compiler_options=opts)
    return report


# ----------------------------------------------------------------------------- reporting

def _fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


def _gib(b):
    return None if b is None else b / 2 ** 30


def _ratio(a, b):
    return None if not a or not b else a / b


def _fw_label(r):
    fw = r["framework"]
    return f"{fw} ({r['backend']})" if fw == "jax" and r.get("backend") else fw


def render_markdown(report: dict) -> str:
    m, rs = report["meta"], report["results"]
    env = m["env"]
    commands = m.get("commands") or [m["command"]]  # several when merged
    lines = [f"# Benchmark: {env['device']}, {m['date']}", "",
             *[f"`{c}`  " for c in commands], "",
             f"preset **{m['preset']}**" + (f" with {m['overrides']}" if m.get("overrides") else "")
             + f", B={m['B']}, T={m['T']}, dtype {m['dtype']}, "
             f"{m['steps']} timed steps after {m['warmup']} warm-up (median), "
             f"JAX options {m['jax_options']}" + (", **fast-compile (timings not representative)**"
                                                   if m.get("fast_compile") else ""), "",
             "versions: " + ", ".join(f"{k} {env.get(k)}" for k in
                                      ("jax", "jaxlib", "flax", "optax", "torch", "torch_cuda",
                                       "cudnn", "jax_platform_version", "python")
                                      if env.get(k) is not None)
             + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
             + (f"; CPU: {env.get('cpu_affinity')} of {env.get('cpu_count')} cores usable, "
                f"torch threads {env.get('torch_threads')}" if env["device"] == "cpu" else ""),
             ""]
    peak = m.get("peak_flops")
    if peak:
        lines += [f"peak: {peak.get('matmul_dtype', 'bfloat16')} matmul {peak['matmul_n']}^3 "
                  "measured "
                  + ", ".join(f"{k[9:]} {v / 1e12:.3g} TFLOP/s" for k, v in peak.items()
                              if k.startswith("measured_"))
                  + (f"; datasheet {peak['datasheet'] / 1e12:.0f} TFLOP/s" if peak.get("datasheet")
                     else "; datasheet: unknown device"), ""]
    if env["device"] == "cpu":
        lines += ["On CPU the absolute numbers mean little (tiny shapes, no tensor cores, bf16 "
                  "emulated, other processes share the cores); read the ratio columns.", ""]
    models = [r for r in rs if r["section"] == "models"]
    if models:
        lines += ["## Models", "", "| model | framework | tokens/s | step ms | MFU (measured peak) "
                  "| MFU (datasheet) | peak memory GiB | memory source | compile s | loss |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in models:
            lines.append(_row(r, [r["model"], _fw_label(r)]))
        lines += ["", "### Ratios (tokens/s)", "",
                  "| model | jax | torch | torch-compile | JAX/torch | JAX/torch-compile |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in dict.fromkeys(r["model"] for r in models):
            tps = {r["framework"]: r.get("tokens_per_s") for r in models if r["model"] == name}
            j, t, tc = tps.get("jax"), tps.get("torch"), tps.get("torch-compile")
            lines.append(f"| {name} | {_fmt(j)} | {_fmt(t)} | {_fmt(tc)} | "
                         f"{_fmt(_ratio(j, t), '.2f')} | {_fmt(_ratio(j, tc), '.2f')} |")
        lines.append("")
    sweep = [r for r in rs if r["section"] in ("sweep", "ceiling")]
    if sweep:
        sw = m["sweep"]
        lines += [f"## MoE sweep ({sw['mode']}: S={sw['shared']} shared expert, "
                  f"capacity_factor {sw['capacity_factor']})", "",
                  "Rows `ceiling` are the same model with every routed expert active (E = k): "
                  "a dense FFN of the active width, the throughput a perfect dispatch reaches.",
                  "", "| E | k | H | total params | active params | framework | tokens/s | "
                  "step ms | MFU (measured peak) | MFU (datasheet) | peak memory GiB | "
                  "memory source | compile s | loss | dropped | ÷ ceiling |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in sweep:
            e = f"ceiling (E={r['E']})" if r["section"] == "ceiling" else str(r["E"])
            c = _ceiling(rs, r)
            lines.append(_row(r, [e, r["k"], r["H"], f"{r['params_total'] / 1e6:.1f}M",
                                  f"{r['params_active'] / 1e6:.1f}M", _fw_label(r)])
                         + f" {_fmt(r.get('dropped_fraction'), '.3f')} |"
                         + f" {_fmt(_ratio(r.get('tokens_per_s'), c), '.2f')} |")
        lines += ["", "### Ratios against PyTorch eager (tokens/s of the column ÷ torch)", ""]
        fws = list(dict.fromkeys(_fw_label(r) for r in sweep))
        lines += ["| E | " + " | ".join(fws) + " | " + " | ".join(
                      f"{f}/torch" for f in fws if f != "torch") + " |",
                  "|---|" + "---:|" * (2 * len(fws) - ("torch" in fws)) ]
        keys = list(dict.fromkeys((r["section"], r["E"]) for r in sweep))
        for sec, E in keys:
            tps = {_fw_label(r): r.get("tokens_per_s") for r in sweep
                   if r["section"] == sec and r["E"] == E}
            t = tps.get("torch")
            name = f"ceiling (E={E})" if sec == "ceiling" else str(E)
            lines.append(f"| {name} | " + " | ".join(_fmt(tps.get(f)) for f in fws) + " | "
                         + " | ".join(_fmt(_ratio(tps.get(f), t), ".2f") for f in fws
                                      if f != "torch") + " |")
        lines.append("")
    errors = [r for r in rs if r.get("error")]
    if errors:
        lines += ["## Failed cells", ""] + [
            f"- {r['section']} {r['model']} {_fw_label(r)}"
            + (f" E={r['E']}" if "E" in r else "") + f": {r['error']}" for r in errors] + [""]
    if report.get("hlo"):
        lines += ["## HLO check: ops whose size grows with E", ""]
        for h in report["hlo"]:
            lines += [f"`{h['dispatch']}` dispatch, E = {h['experts'][0]} vs {h['experts'][1]} "
                      f"(tiny model, B={h['B']} T={h['T']}): **{len(h['grows_with_E'])}** "
                      f"unexpected growing shapes, {len(h['expected_growth'])} expected "
                      f"(expert weights/grads/moments, router (N, E), O(E) bookkeeping); "
                      f"{len(h['unmatched'])} larger and {len(h['unmatched_small'])} O(E)-small "
                      f"shapes present only at the larger E"
                      + (f"; size collisions {h['collisions']}" if h["collisions"] else ""), ""]
            for r in h["grows_with_E"][:10]:
                lines.append(f"- grows: {r['dtype']}[{','.join(r['symbolic'])}] = "
                             f"{r['shape']} (x{r['growth']:.1f}, {r['count']} ops)")
            for r in h["unmatched"][:5]:
                lines.append(f"- only at E={h['experts'][1]}: {r['dtype']}{r['shape']} "
                             f"({r['elements']:,} elements)")
            lines.append("")
    if report.get("cost"):
        lines += ["## XLA cost analysis of the compiled train step (tiny model, layers unrolled)",
                  "", "| dispatch | E | k | H | XLA GFLOP/step | ÷ first E | analytic 6N+12LCT "
                  "GFLOP/step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["cost"]:
            lines.append(f"| {r['dispatch']} | {r['E']} | {r['k']} | {r['H']} | "
                         f"{r['xla_flops'] / 1e9:.3f} | {r['vs_first_E']:.2f} | "
                         f"{r['analytic_flops'] / 1e9:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _ceiling(results: list[dict], r: dict) -> float | None:
    """tokens/s of the ceiling that row ``r`` is held against: for every JAX back end the JAX
    ``dense`` dispatch at E = k (no dispatch work at all), for torch the same framework's."""
    fw = "jax (dense)" if r["framework"] == "jax" else _fw_label(r)
    return next((c.get("tokens_per_s") for c in results if c["section"] == "ceiling"
                 and _fw_label(c) == fw and c["k"] == r["k"] and c["H"] == r["H"]), None)


def _row(r: dict, first: list) -> str:
    cells = [str(x) for x in first]
    if r.get("error"):
        return "| " + " | ".join(cells) + f" | {r['error'][:40]} |" + " |" * 7
    cells += [_fmt(r.get("tokens_per_s")), _fmt(1e3 * r["step_s"], ".1f"),
              _fmt(_pct(r.get("mfu_measured")), ".1f"), _fmt(_pct(r.get("mfu_datasheet")), ".1f"),
              _fmt(_gib(r.get("peak_mem_bytes")), ".2f"), r.get("peak_mem_source", "-"),
              _fmt(r.get("compile_s"), ".1f"), _fmt(r.get("loss"), ".3f")]
    return "| " + " | ".join(cells) + " |"


def _pct(x):
    return None if x is None else 100 * x


def render_plot(report: dict, path: Path) -> bool:
    """tokens/s against E per back end (log2 E), ceilings dashed in the same colour."""
    sweep = [r for r in report["results"] if r["section"] == "sweep" and "tokens_per_s" in r]
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, fw in enumerate(dict.fromkeys(_fw_label(r) for r in sweep)):
        pts = sorted((r["E"], r["tokens_per_s"]) for r in sweep if _fw_label(r) == fw)
        color = f"C{i}"
        ax.plot(*zip(*pts), "o-", color=color, label=fw)
        ceil = [r["tokens_per_s"] for r in report["results"]
                if r["section"] == "ceiling" and _fw_label(r) == fw and "tokens_per_s" in r]
        if ceil and fw in ("jax (dense)", "torch", "torch-compile"):  # merged runs: the first
            ax.axhline(ceil[0], color=color, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    es = sorted({r["E"] for r in sweep})
    ax.set_xticks(es, [str(e) for e in es])
    ax.minorticks_off()
    ax.set_xlabel("routed experts E (fixed active compute)" if report["meta"]["sweep"]["mode"]
                  == "fixed" else "routed experts E (fine-grained, k*H fixed)")
    ax.set_ylabel("training tokens/s")
    m = report["meta"]
    ax.set_title(f"MoeGPT train step, {m['env']['device']}, B={m['B']} T={m['T']} "
                 f"({m['preset']})\ndashed: dense ceiling (E = k)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = report["meta"]["env"]
    stem = f"{slug(env['device'])}-{report['meta']['date'][:10]}"
    if (out_dir / f"{stem}.json").exists():  # several runs a day: keep each
        stem += "-" + report["meta"]["date"][11:19].replace(":", "")
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["md"].write_text(render_markdown(report))
    if render_plot(report, out_dir / f"{stem}.png"):
        paths["png"] = out_dir / f"{stem}.png"
    return paths


def merge_reports(paths: list[str]) -> dict:
    """One report from several runs of the same device (e.g. pieces that each fit a time
    limit): the first run's header, everything's results, the last HLO/cost check."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0])
    merged["results"] = [r for rep in reports for r in rep["results"]]
    merged["hlo"] = next((r["hlo"] for r in reversed(reports) if r.get("hlo")), None)
    merged["cost"] = next((r["cost"] for r in reversed(reports) if r.get("cost")), None)
    merged["meta"] = dict(reports[0]["meta"], merged_from=[str(p) for p in paths],
                          commands=[r["meta"]["command"] for r in reports])
    return merged


# ----------------------------------------------------------------------------- command line

def _csv(kind, choices=None, none_ok=True):
    def parse(text: str):
        if none_ok and text.strip().lower() in ("", "none"):
            return ()
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if kind is int:
            items = tuple(int(t) for t in items)
        bad = [t for t in items if choices and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {choices}")
        return items
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanomoe_jax.bench",
        description="Training throughput (tokens/s, MFU, memory, compile time) of the JAX "
                    "models against the PyTorch reference, an MoE sweep over the routed-expert "
                    "count at fixed active compute, and an HLO/FLOPs check of the MoE step.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes: 'original' (the original's defaults, B=16 T=1024) or 'tiny'; "
                        "default: original on a GPU, tiny otherwise")
    p.add_argument("--models", type=_csv(str, MODELS), default=MODELS,
                   help="comma list of models to time, or 'none' (default: all three)")
    p.add_argument("--frameworks", type=_csv(str, FRAMEWORKS), default=FRAMEWORKS,
                   help="comma list among jax, torch (eager), torch-compile (default: all)")
    p.add_argument("--experts", type=_csv(int), default=None,
                   help="routed-expert counts of the MoE sweep, or 'none' "
                        "(default: the preset's, 4..64 original, 4,8,16 tiny)")
    p.add_argument("--backends", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="JAX MoE dispatch back ends of the sweep (default: all three)")
    p.add_argument("--sweep-mode", choices=("fixed", "fine"), default="fixed",
                   help="fixed (default): k and expert width constant, so the active expert "
                        "parameters are too; fine: k*H constant, experts shrink as E grows")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the dense ceiling (E = k) of the sweep (default: on)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="capacity_factor of the capacity dispatch in the sweep (default: 1.25)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: preset's)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: preset's)")
    p.add_argument("--B", type=int, default=None, help="batch size (default: preset's)")
    p.add_argument("--T", type=int, default=None, help="sequence length (default: preset's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype of both frameworks (default: bfloat16 on a GPU, "
                        "float32 on CPU where bf16 is emulated)")
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=INT",
                   help="override a size field of every model of the preset (and of the HLO "
                        "check's tiny model), e.g. --set n_layer=1; repeatable")
    g = p.add_argument_group("JAX model options (the GPU optimisation plan varies these)")
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="one lax.scan over the layers (default) or a Python loop (unrolled)")
    g.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="rematerialisation policy per layer (default: none)")
    g.add_argument("--attention-impl", choices=("xla", "cudnn"), default=None,
                   help="jax.nn.dot_product_attention implementation (default: JAX's, which is "
                        "XLA's unfused attention; cudnn: flash attention on NVIDIA GPUs)")
    g.add_argument("--loss-chunk-tokens", type=int, default=8192,
                   help="tokens per cross-entropy chunk (default: 8192, at most B*T)")
    g.add_argument("--fast-compile", action="store_true",
                   help="skip XLA's LLVM optimisations (CPU smoke tests: faster compiles, "
                        "slower steps; never for real measurements)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: 8192 for "
                        "original, 512 for tiny)")
    p.add_argument("--isolate", action="store_true",
                   help="run every cell in its own process: exact per-cell peak memory, and an "
                        "OOM cannot disturb later cells (costs an import per cell)")
    h = p.add_argument_group("HLO and FLOPs check (always on the tiny model)")
    h.add_argument("--hlo", action="store_true",
                   help="list HLO ops growing with E and XLA's FLOPs per back end and E")
    h.add_argument("--hlo-experts", type=_csv(int, none_ok=False), default=(13, 52),
                   help="the two routed-expert counts the HLO shapes are compared at (default: "
                        "13,52; E, E-S and the slot count must not equal another dimension of the "
                        "model: see 'collisions' in the report)")
    h.add_argument("--hlo-dispatches", type=_csv(str, BACKENDS), default=("capacity", "dense"),
                   help="back ends whose HLO is checked (default: capacity,dense)")
    h.add_argument("--cost-experts", type=_csv(int, none_ok=False), default=(4, 8, 16, 32, 64),
                   help="routed-expert counts of the FLOP table (default: 4,8,16,32,64)")
    h.add_argument("--cost-dispatches", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="back ends of the FLOP table (default: all three)")
    p.add_argument("--list", action="store_true",
                   help="print the cells this command would time (sizes, FLOPs) and exit")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for .json/.md/.png (default: benchmarks/results)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="write one report from earlier runs' JSON files and exit")
    p.add_argument("--_cell", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.merge or args._cell:
        return args
    gpu = has_cuda()
    args.preset = args.preset or ("original" if gpu else "tiny")
    try:
        shape = dict(kv.split("=", 1) for kv in args.overrides)
        shape = {k: int(v) for k, v in shape.items()}
    except ValueError:
        p.error(f"--set takes FIELD=INT, got {args.overrides}")
    bad = sorted(set(shape) - {"n_layer", "n_embd", "n_head", "block_size", "vocab_size"})
    if bad:
        p.error(f"--set: {bad} not among n_layer, n_embd, n_head, block_size, vocab_size")
    args.shape = shape
    preset = PRESETS[args.preset]
    for name in ("steps", "warmup", "B", "T", "matmul_n"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.experts is None:
        args.experts = preset.experts
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if len(args.hlo_experts) != 2:
        p.error("--hlo-experts takes two counts")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._cell:  # a child of --isolate: one cell, one result line
        print(RESULT_TAG + json.dumps(run_cell(json.loads(args._cell)), default=str))
        return {}
    if args.merge:
        report = merge_reports(args.merge)
    else:
        report = run(args)
        if args.list:
            return report
    paths = write_report(report, Path(args.out))
    print()
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    report["paths"] = {k: str(v) for k, v in paths.items()}
    return report


if __name__ == "__main__":
    main()
