"""One timed cell: a (config, framework) training step in JAX, torch eager or
`torch.compile`, in this process or a fresh one (``--isolate``).

jax, torch and their models are imported where used: a cell imports only its framework."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np

from nanomoe.config import config_from_dict
from nanomoe.flops import active_params, flops_per_token

from .configs import LR, RESULT_TAG, total_params
from .env import max_rss_bytes, pipelined_steps, timed_steps


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


def _dispatch(config, spec: dict) -> str | None:
    """The model table runs the back end train.py picks (None: execution_options decides);
    the sweep and the HLO check run the one their config names, whatever the device."""
    given = spec["jax_options"].get("moe_dispatch")
    if given or spec.get("labels", {}).get("section") == "models":
        return given
    return getattr(config, "moe_dispatch", None)


def jax_train_step(config, spec: dict):
    """(compiled step, lowering seconds, compile seconds, state, lr_mult, batch) of one config.

    The step is the project's own ``train_step`` with one micro-batch (x of shape (1, B, T)),
    jitted with the (params, opt_state) argument donated as the JAX backend does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nanomoe_jax import create_model
    from nanomoe_jax.execution import describe, execution_options, options_kwargs
    from nanomoe_jax.train import make_optimizer, train_step

    o = spec["jax_options"]
    # the options train.py would pick on this device; the benchmark's flags (None = decide) win
    opts = execution_options(jax.devices()[0], config, dtype=spec["dtype"],
                             scan_layers=o["scan_layers"], remat=o["remat"],
                             attention_impl=o["attention_impl"],
                             loss_chunk_tokens=o["loss_chunk_tokens"],
                             row_groups=o.get("row_groups"),
                             moe_dispatch=_dispatch(config, spec))
    spec["resolved_options"] = describe(opts)  # what the cell ran, decided or given
    model = create_model(config, spec.get("seed"), **options_kwargs(opts))
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


def prepare_jax(config, spec: dict):
    """(res, step, sync, finish): the compiled step ready to call; ``finish()`` adds the
    final loss and peak memory to ``res`` and frees the state."""
    import jax

    device = jax.devices()[0]
    stats0 = device.memory_stats() or {}
    compiled, lower_s, compile_s, state, lr_mult, (x, y, lr) = jax_train_step(config, spec)
    res: dict[str, Any] = {"lower_s": lower_s, "compile_s": lower_s + compile_s,
                           "jax_execution": spec.get("resolved_options")}
    mem = compiled.memory_analysis()
    if mem is not None:
        # What XLA planned for this program: live arguments + outputs (donated ones counted
        # once) + temporaries. Per cell, unlike the process-wide high-water marks.
        res["xla_mem_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    box = {"state": state, "metrics": None}

    def step():  # returns the step's metrics: the state is donated to the next step
        box["state"], box["metrics"] = compiled(lr_mult, box["state"], x, y, lr)
        return box["metrics"]

    def finish():
        jax.block_until_ready(box["state"])
        metrics = jax.device_get(box["metrics"])
        res["loss"] = float(metrics["loss"])
        if "dropped_fraction" in metrics:
            res["dropped_fraction"] = float(metrics["dropped_fraction"])
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peak, before = stats["peak_bytes_in_use"], stats0.get("peak_bytes_in_use", 0)
            # The allocator's peak is a process high-water mark: it belongs to this cell only
            # if it rose during it (always so with --isolate).
            if peak > before or spec.get("isolated"):
                res.update(peak_mem_bytes=int(peak), peak_mem_source="jax peak_bytes_in_use")
            elif "xla_mem_bytes" in res:
                res.update(peak_mem_bytes=res["xla_mem_bytes"],
                           peak_mem_source="xla memory_analysis")
        else:
            res.update(peak_mem_bytes=max_rss_bytes(), peak_mem_source="process max RSS")
        box.clear()
        return res

    return res, step, jax.block_until_ready, finish


def time_cell(step, wait, spec: dict) -> list[float]:
    """The first step alone (compile time shows there), then the rest as train.py runs them;
    ``times[spec["warmup"]:]`` are the timed steps."""
    first = timed_steps(step, wait, 0, 1)
    return first + pipelined_steps(step, wait, max(spec["warmup"] - 1, 0) + spec["steps"])


def run_jax(config, spec: dict) -> dict:
    res, step, sync, finish = prepare_jax(config, spec)
    res["times"] = time_cell(step, sync, spec)
    return finish()


def prepare_torch(config, spec: dict):
    """(res, step, sync, finish) of the original's step in torch eager or torch.compile."""
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
    box = {}

    def step():
        # The original's step: autocast forward and loss, backward, clip to 1.0, AdamW.
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            _, losses = forward(x, y)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        box["loss"] = losses["loss"]
        return box["loss"]

    res: dict[str, Any] = {}

    def finish():
        res["loss"] = float(box["loss"].detach())
        if cuda:
            res.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()),
                       peak_mem_source="torch max_memory_allocated")
        else:
            res.update(peak_mem_bytes=max_rss_bytes(), peak_mem_source="process max RSS")
        box.clear()
        return res

    # waits for that step's loss: on CUDA the next step's kernels stay queued behind it
    sync = (lambda loss: loss.item()) if cuda else (lambda _: None)
    return res, step, sync, finish


def run_torch(config, spec: dict) -> dict:
    res, step, sync, finish = prepare_torch(config, spec)
    res["times"] = time_cell(step, sync, spec)
    return finish()


def run_isolated(spec: dict) -> dict:
    """The cell in a fresh Python process: exact per-cell peak memory, and an OOM or a CUDA
    error there cannot poison the cells after it."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--_cell", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(spec["labels"], framework=spec["framework"],
                error=f"child process exited {proc.returncode}: {tail[0][:300]}")


