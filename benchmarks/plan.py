"""The GPU plan: compile the train step train.py runs, for a named GPU, on any machine.

    JAX_PLATFORMS=cpu python -m benchmarks.plan --target rtx4090 [--check]
    python -m benchmarks.plan --target h100 --model gpt --B 8 --set n_layer=24

With no GPU the CUDA plugin (``pip install -e ".[plan]"``) compiles for a compile-only device
described by ``benchmarks/targets/<target>.textproto``; on a machine with a GPU the real
device is used. Per model it reports the planned peak memory against the card's, the kernels
of the compiled program (and any custom call whose FLOPs it cannot count), matmul FLOPs against
the analytic count, bytes accessed, the MoE layers' bytes against their floor, and a roofline
estimate. ``plan()`` is the library entry point (one config, one dict); the command writes to
``~/.cache/nanomoe/results`` unless ``--out`` (``--out benchmarks/results``: the committed
reference).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanomoe.config import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.flops import active_params
from nanomoe_jax import model_class
from nanomoe_jax import sharding as shd
from nanomoe_jax.execution import describe, execution_options, options_kwargs
from nanomoe_jax.ragged_gemm import compiling_for
from nanomoe_jax.train import jit_train_step, make_optimizer

from . import hlo, hlo_moe
from .targets import GiB, Target, compile_devices, load_target

# The original's 4090 configs (vocab padded to 50304 as its train.py does), B=16, T=1024.
FINE_MOE = dict(n_experts=16, m_sub_experts=4, n_activated_experts=8, expert_dim=256)
MODELS = {
    "gpt": (GPTConfig, dict(vocab_size=50304)),
    "moderngpt": (ModernGPTConfig, dict(vocab_size=50304, n_kv_head=1)),
    "moegpt": (MoeGPTConfig, {}),
    "moegpt-64": (MoeGPTConfig, FINE_MOE),
    "ngpt": (nGPTConfig, {}),
}
BOUNDS = dict(flops_ratio=1.10)  # and peak <= the target's budget, flash attention present
RECIPE_TOKENS = 262144  # the original's total_batch_size (train.py's default), one card


def recipe_accumulation(B: int, T: int) -> int:
    """Micro-batches per optimizer step of train.py's default run on one card: its
    total_batch_size over B x T (16 at B=16, T=1024)."""
    return max(1, RECIPE_TOKENS // (B * T))


def model_config(name: str, overrides: dict | None = None):
    cls, fields = MODELS[name]
    return cls(**{**fields, **(overrides or {})})


def analytic_flops(config, B: int, T: int, flash: bool) -> float:
    """6 N_active per token for the weights, plus the attention matmuls the kernel must do:
    12 L C T (XLA computes the full masked T x T) or 6 L C T (a causal flash kernel skips the
    masked half)."""
    attention = (6 if flash else 12) * config.n_layer * config.n_embd * T
    return float((6 * active_params(config) + attention) * B * T)


def abstract_step_inputs(config, opts, mesh, B: int, T: int, A: int = 1):
    """The step train.py builds (same optimizer, shardings and jit), with abstract values:
    A micro-batches of B x T rows on each of the mesh's devices."""
    model = nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(0),
                                                       **options_kwargs(opts)))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config, params)
    replicated = NamedSharding(mesh, P())
    param_sh = shd.tree_shardings(params, mesh, config)
    opt_shape = jax.eval_shape(tx.init, params)
    state_sh = (param_sh, shd.tree_shardings(opt_shape, mesh, config))
    batch_sh = shd.batch_sharding(mesh)
    step = jit_train_step(graphdef, tx, state_sh, batch_sh, replicated)

    def sds(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    state = jax.tree.map(sds, (params, opt_shape), state_sh)
    lr_mult = jax.tree.map(lambda _: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
                           params)
    batch = jax.ShapeDtypeStruct((A, mesh.size, B, T), jnp.int32, sharding=batch_sh)  # A,D,B,T
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    return step, (lr_mult, state, batch, batch, lr)


def plan(model: str | Any, target: str | Target = "rtx4090", B: int = 16, T: int = 1024,
         overrides: dict | None = None, options: dict | None = None,
         A: int | None = None) -> dict:
    """Compile one train step and return its plan: memory, kernels, FLOPs, roofline.

    ``model``: a name of :data:`MODELS` or a config; ``overrides``: config fields;
    ``options``: execution-option overrides (e.g. ``{"attention_impl": "xla"}``); ``A``:
    micro-batches per optimizer step (default: the recipe's, :func:`recipe_accumulation`),
    so the once-a-step AdamW pass and the gradient accumulation weigh what they weigh in
    train.py's default run."""
    A = A or recipe_accumulation(B, T)
    target = load_target(target) if isinstance(target, str) else target
    config = model_config(model, overrides) if isinstance(model, str) else model
    name = model if isinstance(model, str) else type(config).__name__
    devices, source = compile_devices(target)
    opts = execution_options(devices[0], config, **(options or {}))
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "expert": 1}, devices=devices)
    t0 = time.perf_counter()
    with compiling_for(devices[0]):  # tokamax's kernels for the target, not this machine
        step, args = abstract_step_inputs(config, opts, mesh, B, T, A)
        compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return summarize(compiled, config, name, target, source, opts, B, T, compile_s, A)


def peak_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                 aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes)
    parts["peak"] = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
    return {k: int(v) for k, v in parts.items()}


def xla_cost_flops(compiled) -> float | None:
    """XLA's generic cost model on the GPU-optimised module (custom calls 0, loops once):
    reported beside the plan's own count as a cross-check."""
    try:
        from jax._src.lib import _jax

        cpu = jax.devices("cpu")[0].client
        return float(_jax.hlo_module_cost_analysis(cpu, compiled.runtime_executable()
                                                   .hlo_modules()[0]).get("flops", 0.0))
    except Exception:  # noqa: BLE001 - a private API: absent in some jaxlib versions
        return None


def summarize(compiled, config, name, target: Target, source, opts, B, T, compile_s,
              A: int = 1) -> dict:
    """The plan of an optimizer step of A micro-batches: totals per step, the roofline
    estimate per step and per micro-batch, MFU over the step."""
    stats = hlo.program_stats(compiled.as_text())
    flash = stats.custom_calls.get("__cudnn$fmhaSoftmax", 0) > 0 or any(
        "fmha" in k for k in stats.custom_calls)
    analytic = A * analytic_flops(config, B, T, flash)
    step_s = hlo.roofline_seconds(stats, target.peak_bf16, target.bandwidth)
    mem = peak_bytes(compiled)
    grouped = stats.flops_by_kind.get("grouped-gemm", 0) + stats.flops_by_kind.get("ragged-dot", 0)
    row = {
        "model": name, "config": {k: v for k, v in vars(config).items()}, "B": B, "T": T,
        "A": A,
        "target": target.name, "device_kind": target.device_kind, "device": source,
        "options": describe(opts), "compile_s": round(compile_s, 1),
        "memory": mem, "budget_bytes": target.budget_bytes, "card_bytes": target.memory_bytes,
        "flash_attention": flash,
        "custom_calls": dict(stats.custom_calls), "gemm_backends": dict(stats.gemm_backends),
        "grouped_gemm": grouped > 0, "fusions": stats.fusions,
        "loops": [list(x) for x in stats.loops],
        "compiled_flops": stats.flops, "flops_by_kind": dict(stats.flops_by_kind),
        "analytic_flops": analytic, "flops_ratio": stats.flops / analytic,
        "xla_cost_model_flops": xla_cost_flops(compiled),
        "bytes_accessed": hlo.bytes_accessed(stats),
        "estimate": {"step_s": step_s, "micro_batch_s": step_s / A,
                     "tokens_per_s": A * B * T / step_s,
                     "mfu_bound": analytic / step_s / target.peak_bf16},
        "uncounted": dict(stats.uncounted),
        # slices of the stacks the forward layer scan fills and the backward scan reads
        "scan_residual_bytes": float(sum(p.bytes * k.mult for k in stats.kernels
                                         for p in k.parts if p.residual)),
    }
    if isinstance(config, MoeGPTConfig):
        row["moe_bytes"] = moe_summary(stats, config, B, T, A)
        row["moe_dispatch"] = opts.moe_dispatch or config.moe_dispatch
        row["may_drop"] = may_drop(config, row["moe_dispatch"])
    return row


def may_drop(config, dispatch: str) -> bool:
    """Whether the step can drop assignments: only the capacity dispatch does, and only below
    capacity_factor = routed experts / k (an expert then has fewer slots than tokens)."""
    return dispatch == "capacity" and (
        config.capacity_factor * config.n_activated_experts < config.n_routed_experts)


def moe_summary(stats, config, B: int, T: int, A: int = 1) -> dict:
    """MoE-layer bytes of the step by part against the floor (every MoE matmul operand read
    once, per micro-batch)."""
    parts = hlo_moe.moe_bytes(stats, config, tokens=B * T)  # one micro-batch's arrays
    floor = A * hlo_moe.min_moe_bytes(config, B, T)
    return {**parts, "minimum": floor, "ratio": parts["total"] / floor}


def add_mfu_ratios(rows: list[dict]) -> None:
    """Each row's estimated MFU over GPT's (same target, batch and T), where GPT was planned."""
    gpt = next((r for r in rows if r.get("model") == "gpt" and "estimate" in r), None)
    for r in rows:
        if gpt is not None and "estimate" in r:
            r["estimate"]["mfu_vs_gpt"] = r["estimate"]["mfu_bound"] / gpt["estimate"]["mfu_bound"]


def broken_bounds(row: dict) -> list[str]:
    """One sentence per bound the plan breaks (the CI check)."""
    out = []
    if row["memory"]["peak"] > row["budget_bytes"]:
        out.append(f"{row['model']}: planned peak {row['memory']['peak'] / GiB:.1f} GiB is over "
                   f"the {row['budget_bytes'] / GiB:.0f} GiB budget of {row['device_kind']}")
    if not row["flash_attention"]:
        out.append(f"{row['model']}: no flash attention (__cudnn$fmha...) in the compiled step")
    if row.get("uncounted"):
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(row["uncounted"].items()))
        out.append(f"{row['model']}: custom calls whose FLOPs the plan cannot count: {listed} "
                   "(give the kernel pallas_call(metadata={'flops': ...}) or teach "
                   "benchmarks/hlo_flops.py its formula)")
    if row.get("may_drop"):
        out.append(f"{row['model']}: the capacity dispatch can drop assignments "
                   f"(capacity_factor {row['config']['capacity_factor']} < routed experts / k)")
    if row["flops_ratio"] > BOUNDS["flops_ratio"]:
        out.append(f"{row['model']}: compiled/analytic FLOPs {row['flops_ratio']:.3f} > "
                   f"{BOUNDS['flops_ratio']:.2f}")
    return out


if __name__ == "__main__":  # python -m benchmarks.plan: its command line imports this module
    from .plan_cli import main

    raise SystemExit(main())
