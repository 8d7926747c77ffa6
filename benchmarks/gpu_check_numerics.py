"""Numerics on the device, before anything is timed (``gpu_check``'s second part).

* **step**: for GPT, ModernGPT, MoeGPT and nGPT, the JAX train step (``nanomoe_jax.train.
  train_step``, bf16, the options train.py picks on this device: cuDNN attention, grouped
  MoE dispatch) against the torch reference in fp32 on the same device, same weights, same
  batch: loss and gradient norm within 2e-2 relative, the tests' bf16 tolerance. torch's own
  bf16 autocast step is reported beside it, so a miss can be read against torch's bf16 noise.
* **moe dispatch**: MoeGPT-64's routed experts (16 x 4 sub-experts, top 8) through every JAX
  back end this version has (``tokamax`` when nanomoe offers it) against ``dense``, the
  original's math: logits, loss and gradient norm, bf16, same 2e-2.
* **attention**: cuDNN flash attention (the custom-VJP CPU kernel where cuDNN is absent)
  against XLA's attention, ModernGPT, bf16, same 2e-2.

The models keep the original's widths at 2 layers (compiles in seconds); the weights are the
seeded init with the zero-initialised tensors (MoE expert projections) filled, so every
gradient is non-zero.

jax, torch and their models are imported where used: each check imports only its framework.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from functools import partial

import numpy as np

from nanomoe.config import MoeGPTConfig, nGPTConfig

from .gpu_check_run import PARTIAL_TAG

TOL = 2e-2  # tests: bf16 vs the fp32 reference, loss and every token's logits
SEED = 1337


def numerics_part(sz: dict) -> dict:
    n = sz["numerics"]
    checks: list[dict] = []
    for model in ("gpt", "moderngpt", "moegpt", "ngpt"):
        guarded(checks, f"step {model}", lambda m=model: step_check(config_of(m, n), n, sz))
    guarded(checks, "moe dispatch", lambda: dispatch_checks(config_of("moegpt-64", n), n, sz))
    guarded(checks, "attention", lambda: attention_checks(config_of("moderngpt", n), n, sz))
    failed = [c["check"] for c in checks if not c.get("ok")]
    return {"tolerance": TOL, "checks": checks, "failed": failed}


def guarded(checks: list, name: str, fn) -> None:
    """One check (or a list of them); an exception is a failed row and the rest go on. Each
    row is printed as a partial result at once, so a part cut short by its limit keeps it."""
    t0, n0 = time.perf_counter(), len(checks)
    try:
        out = fn()
        checks.extend(out if isinstance(out, list) else [out])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        checks.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
    for row in checks[n0:]:
        row["seconds"] = round((time.perf_counter() - t0) / (len(checks) - n0), 1)
        print(f"  {row['check']}: {'ok' if row.get('ok') else 'FAILED'} "
              + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)),
              flush=True)
        print(PARTIAL_TAG + json.dumps(row, default=str), flush=True)


def config_of(name: str, n: dict):
    from .plan import model_config

    if name == "ngpt":
        return nGPTConfig(**n["shape"])
    return model_config(name, n["shape"])


def rel(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def batch(config, n: dict):
    g = np.random.default_rng(0)
    x = g.integers(0, config.vocab_size, (n["B"], n["T"]))
    return x, np.roll(x, -1, axis=-1)


def torch_model(config):
    import torch

    import nanomoe_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tm = nanomoe_torch.create_model(config, SEED).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    with torch.no_grad():
        for p in tm.parameters():
            if p.dim() >= 2 and not p.any():  # zero-init (MoE proj): no gradient upstream
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return tm, dev


def torch_loss_and_norm(tm, x, y, dev, bf16: bool) -> tuple[float, float]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    torch.backends.cudnn.allow_tf32 = False
    tm.zero_grad(set_to_none=True)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
        loss = tm(xt, yt)[1]["loss"]
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in tm.parameters()
                          if p.grad is not None))
    return float(loss.detach()), float(norm)


def jax_model(config, state_dict, **overrides):
    import jax
    from flax import nnx

    import conversion
    import nanomoe_jax
    from nanomoe_jax.execution import describe, execution_options, options_kwargs

    opts = execution_options(jax.devices()[0], config, dtype="bfloat16", **overrides)
    model = nanomoe_jax.model_class(config)(config, rngs=nnx.Rngs(0), **options_kwargs(opts))
    weights = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    return conversion.load_torch_weights(model, weights), describe(opts)


def jax_step(model, config, x, y) -> tuple[float, float]:
    """(loss, gradient norm) from one call of the project's train step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nanomoe_jax.train import make_optimizer, train_step

    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config, params)
    lr_mult = jax.tree.map(lambda _: 1.0, params)
    step = jax.jit(partial(train_step, graphdef, tx))
    _, metrics = step(lr_mult, (params, tx.init(params)), jnp.asarray(x)[None],
                      jnp.asarray(y)[None], jnp.float32(1e-4))
    metrics = jax.device_get(metrics)
    return float(metrics["loss"]), float(metrics["grad_norm"])


def jax_logits(model, x) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx

    out = nnx.jit(lambda m, i: m(i)[0])(model, jnp.asarray(x))
    return np.asarray(out, np.float32)


def step_check(config, n: dict, sz: dict) -> dict:
    tm, dev = torch_model(config)
    x, y = batch(config, n)
    jm, opts = jax_model(config, tm.state_dict())
    j_loss, j_norm = jax_step(jm, config, x, y)
    t_loss, t_norm = torch_loss_and_norm(tm, x, y, dev, bf16=False)
    b_loss, b_norm = torch_loss_and_norm(tm, x, y, dev, bf16=True)
    row = {"check": f"step {type(config).__name__}", "jax": opts, "B": n["B"], "T": n["T"],
           "loss_jax_bf16": j_loss, "loss_torch_fp32": t_loss,
           "grad_norm_jax_bf16": j_norm, "grad_norm_torch_fp32": t_norm,
           "loss_rel": rel(j_loss, t_loss), "grad_norm_rel": rel(j_norm, t_norm),
           "torch_bf16_loss_rel": rel(b_loss, t_loss),
           "torch_bf16_grad_norm_rel": rel(b_norm, t_norm)}
    row["ok"] = row["loss_rel"] <= TOL and row["grad_norm_rel"] <= TOL
    return row


def moe_dispatches() -> list[str]:
    """The back ends this version of nanomoe accepts, ``tokamax`` included when it does: the
    config's own validation decides, so nothing here depends on it existing."""
    out = []
    for d in ("grouped", "capacity", "ragged", "tokamax"):
        try:
            MoeGPTConfig(moe_dispatch=d)
        except Exception:  # noqa: BLE001 - not offered by this version
            continue
        out.append(d)
    return out


def compare(name: str, ref: tuple, got: tuple, extra: dict) -> dict:
    (rl, rloss, rnorm), (gl, gloss, gnorm) = ref, got
    row = dict(extra, check=name,
               logits_rel=float(np.abs(gl - rl).max() / max(np.abs(rl).max(), 1e-30)),
               loss_rel=rel(gloss, rloss), grad_norm_rel=rel(gnorm, rnorm))
    row["ok"] = all(row[k] <= TOL for k in ("logits_rel", "loss_rel", "grad_norm_rel"))
    return row


def dispatch_checks(config, n: dict, sz: dict) -> list[dict]:
    # capacity at a factor where nothing can drop: then it computes what dense does
    config = dataclasses.replace(config, capacity_factor=config.n_routed_experts
                                 / config.n_activated_experts)
    tm, _ = torch_model(config)
    x, y = batch(config, n)
    sd = tm.state_dict()

    def run(dispatch):
        m, _ = jax_model(config, sd, moe_dispatch=dispatch)
        return (jax_logits(m, x), *jax_step(m, config, x, y))

    ref = run("dense")
    rows = []
    for d in moe_dispatches():
        try:
            rows.append(compare(f"moe dispatch {d} vs dense", ref, run(d),
                                {"config": "moegpt-64", "B": n["B"], "T": n["T"]}))
        except Exception as e:  # noqa: BLE001 - one back end failing leaves the others
            traceback.print_exc()
            rows.append({"check": f"moe dispatch {d} vs dense", "ok": False,
                         "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def attention_checks(config, n: dict, sz: dict) -> list[dict]:
    import jax

    from nanomoe_jax.execution import flash_attention_ok

    tm, _ = torch_model(config)
    x, y = batch(config, n)
    sd = tm.state_dict()
    flash = flash_attention_ok(jax.devices()[0], "bfloat16", config)
    impl = "cudnn" if flash else "custom_vjp"

    def run(attention_impl):
        m, _ = jax_model(config, sd, attention_impl=attention_impl)
        return (jax_logits(m, x), *jax_step(m, config, x, y))

    note = "" if flash else " (cuDNN flash attention not available on this device)"
    return [compare(f"attention {impl} vs xla{note}", run("xla"), run(impl),
                    {"config": "moderngpt", "B": n["B"], "T": n["T"]})]
