"""Properties of the Flax models that need no reference: causality, scan/unrolled/remat
equivalence, the chunked loss, the shared init and input checks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
import nanomoe_jax
import nanomoe_torch
from helpers import (ALL_CONFIGS, GPT_CONFIGS, MODERN_CONFIGS, MOE_CONFIGS, NGPT_CONFIGS, jax_twin,
                     random_torch_model, tokens)

SOME = {"gpt": GPT_CONFIGS["gpt"], "modern": MODERN_CONFIGS["gqa-gated"],
        "moe": MOE_CONFIGS["s2-nobias"], "ngpt": NGPT_CONFIGS["ngpt"]}


@nnx.jit
def loss_and_grads(model, idx, tgt):
    def loss_fn(m):
        out = m(idx, tgt)
        return out[1]["loss"], out[0]

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads


@pytest.mark.parametrize("name", list(SOME))
def test_causality(name):
    """Changing token t changes no logit before t in any row (the MoE under tight capacity
    too: expert slots go to earlier positions first, whatever the row)."""
    config = SOME[name]
    model = jax_twin(random_torch_model(config, seed=6), dtype=jnp.float32)
    if name == "moe":  # tight capacity: tokens do drop
        config = type(config)(**{**config.__dict__, "capacity_factor": 0.5})
        model = jax_twin(random_torch_model(config, seed=6), dtype=jnp.float32)
    forward = nnx.jit(lambda m, i: m(i)[0])
    idx, _ = tokens(config, B=2, T=24, seed=6)
    base = np.asarray(forward(model, jnp.asarray(idx)))
    for t in (0, 7, 23):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1 + np.arange(2)) % config.vocab_size
        out = np.asarray(forward(model, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def remat_policies(model, idx, tgt) -> list[str]:
    """The checkpoint policy of every remat in the traced loss (empty: nothing rematerialised)."""
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(idx, tgt)[1]["loss"])(state))
    return re.findall(r"remat2\[.*?policy=(?:<function )?(\w+)", jaxpr, re.S)


@pytest.mark.parametrize("name", list(SOME))
def test_scan_unrolled_and_remat_agree(name):
    """Same loss, logits and gradients in every layout; and remat is really in the program
    (the numbers cannot tell: remat changes only what the backward pass recomputes)."""
    config = SOME[name]
    tm = random_torch_model(config, seed=7)
    idx, tgt = map(jnp.asarray, tokens(config, seed=7))
    results = {}
    policy = {"none": [], "full": ["nothing_saveable"], "dots": ["DotsSaveable"]}
    # remat under scan (the default layout), and the unrolled loop with and without remat
    for scan, remat in ((True, "none"), (True, "full"), (True, "dots"), (False, "none"),
                        (False, "full")):
        model = jax_twin(tm, dtype=jnp.float32, scan_layers=scan, remat=remat)
        found = remat_policies(model, idx, tgt)
        assert set(found) == set(policy[remat]), (scan, remat, found)
        assert len(found) == (0 if remat == "none" else 1 if scan else config.n_layer)
        loss, logits, grads = loss_and_grads(model, idx, tgt)
        holder = nnx.clone(model)
        nnx.update(holder, grads)
        results[scan, remat] = (float(loss), np.asarray(logits), conversion.export_arrays(holder))
    ref_loss, ref_logits, ref_grads = results[True, "none"]
    for key, (loss, logits, grads) in results.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6, err_msg=str(key))
        for k in ref_grads:
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5,
                                       atol=1e-6 * np.abs(ref_grads[k]).max(), err_msg=f"{key} {k}")


@pytest.mark.parametrize("name", list(SOME))
def test_chunked_loss_equals_whole(name):
    """A chunk size that does not divide B*T (padding) gives the loss and gradients of one chunk."""
    config = SOME[name]
    tm = random_torch_model(config, seed=8)
    idx, tgt = tokens(config, B=3, T=11, seed=8, ignore_some=name != "gpt")
    idx, tgt = jnp.asarray(idx), jnp.asarray(tgt)
    whole = loss_and_grads(jax_twin(tm, dtype=jnp.float32, loss_chunk_tokens=4096), idx, tgt)
    chunked = loss_and_grads(jax_twin(tm, dtype=jnp.float32, loss_chunk_tokens=7), idx, tgt)
    np.testing.assert_allclose(float(chunked[0]), float(whole[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunked[2]), jax.tree.leaves(whole[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(SOME))
def test_loss_does_not_keep_full_fp32_logits(name):
    """Under jit, a loss-only step holds no (B*T, V) fp32 array: logits live one chunk at a
    time (each model passes its loss_chunk_tokens down)."""
    config = dataclasses.replace(SOME[name], vocab_size=97)  # a vocab no other dimension equals
    model = nanomoe_jax.create_model(config, 0, dtype=jnp.float32, loss_chunk_tokens=8)
    graphdef, state = nnx.split(model)
    idx = jnp.zeros((4, 32), jnp.int32)

    def loss(state):
        return nnx.merge(graphdef, state)(idx, idx)[1]["loss"]

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    full = f"f32[128,{config.vocab_size}]"
    assert full not in hlo and f"f32[4,32,{config.vocab_size}]" not in hlo
    assert f"f32[8,{config.vocab_size}]" in hlo


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_create_model_holds_the_shared_numpy_init(name):
    """--seed S gives bit-identical weights in both frameworks."""
    config = ALL_CONFIGS[name]
    jm = nanomoe_jax.create_model(config, seed=11)
    tm = nanomoe_torch.create_model(config, seed=11)
    exported = conversion.export_arrays(jm)
    state = tm.state_dict()
    assert set(exported) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
    other = conversion.export_arrays(nanomoe_jax.create_model(config, seed=12))
    assert not np.array_equal(other["wte.weight" if "wte.weight" in other else "transformer.wte.weight"],
                              exported["wte.weight" if "wte.weight" in exported else "transformer.wte.weight"])


@pytest.mark.parametrize("name", list(SOME))
def test_sequence_longer_than_block_size_is_refused(name):
    config = SOME[name]
    model = nanomoe_jax.create_model(config, 0)
    with pytest.raises(ValueError, match="block_size"):
        model(jnp.zeros((1, config.block_size + 1), jnp.int32))


@pytest.mark.parametrize("bad", [dict(remat="sometimes"), dict(loss_chunk_tokens=0),
                                 dict(row_groups=0), dict(moe_dispatch="sparse")],
                         ids=lambda d: next(iter(d)))
def test_options_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        nanomoe_jax.create_model(GPT_CONFIGS["gpt"], 0, **bad)


def plain_loss(h_NC, w_VC, t_N, ignore_index, dtype):
    """The unchunked tied-head cross-entropy, differentiated by JAX (the reference)."""
    import optax

    logits_NV = jnp.einsum("nc,vc->nv", h_NC.astype(dtype), w_VC.astype(dtype)).astype(jnp.float32)
    valid_N = t_N != ignore_index
    nll_N = optax.losses.softmax_cross_entropy_with_integer_labels(logits_NV, jnp.where(valid_N, t_N, 0))
    return jnp.sum(jnp.where(valid_N, nll_N, 0.0)) / jnp.sum(valid_N)


def loss_case(ignore_index, N=37, C=16, V=53):
    k = jax.random.split(jax.random.key(5), 3)
    h_NC = jax.random.normal(k[0], (N, C))
    w_VC = 0.3 * jax.random.normal(k[1], (V, C))
    t_N = jax.random.randint(k[2], (N,), 0, V)
    if ignore_index == -1:  # ModernGPT/MoeGPT: some targets ignored, the last chunk's too
        t_N = t_N.at[::5].set(-1).at[-3:].set(-1)
    return h_NC, w_VC, t_N


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ignore_index", [-1, -100])
@pytest.mark.parametrize("chunk", [8, 37, 4096])
def test_fused_loss_equals_plain_loss(dtype, ignore_index, chunk):
    """The fused loss (gradients made in its forward pass) against the plain unchunked loss:
    value, gradients, and the value of an undifferentiated call; chunk 8 does not divide N."""
    from nanomoe_jax.loss import tied_cross_entropy

    dtype = jnp.dtype(dtype)
    h_NC, w_VC, t_N = loss_case(ignore_index)
    fused = jax.jit(jax.value_and_grad(
        lambda h, w: tied_cross_entropy(h, w, t_N, ignore_index, chunk, dtype), argnums=(0, 1)))
    plain = jax.jit(jax.value_and_grad(
        lambda h, w: plain_loss(h, w, t_N, ignore_index, dtype), argnums=(0, 1)))
    (loss, grads), (ref_loss, ref_grads) = fused(h_NC, w_VC), plain(h_NC, w_VC)
    eval_loss = jax.jit(lambda h, w: tied_cross_entropy(h, w, t_N, ignore_index, chunk, dtype))(h_NC, w_VC)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the project's bf16 tolerance
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    np.testing.assert_allclose(float(eval_loss), float(ref_loss), rtol=tol)
    for g, ref in zip(grads, ref_grads):
        scale = float(jnp.abs(ref).max())
        assert scale > 0
        np.testing.assert_allclose(g, ref, rtol=tol, atol=tol * scale)
    if ignore_index == -1:  # ignored rows get no gradient
        assert float(jnp.abs(grads[0][t_N == -1]).max()) == 0.0


def count_dots(hlo: str) -> int:
    """Matmuls in a compiled module (a loop body's counted once)."""
    return len(re.findall(r" dot\(", hlo))


def test_fused_loss_has_no_recompute_and_eval_no_gradient():
    """The differentiated program has three vocabulary matmuls (logits, d hidden, d embedding),
    none recomputed in the backward pass; the undifferentiated one has only the logits."""
    from nanomoe_jax.loss import tied_cross_entropy

    h_NC, w_VC, t_N = loss_case(-1)

    def f(h, w):
        return tied_cross_entropy(h, w, t_N, -1, 8, jnp.float32)

    grad_hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h_NC, w_VC).compile().as_text()
    eval_hlo = jax.jit(f).lower(h_NC, w_VC).compile().as_text()
    assert count_dots(grad_hlo) == 3
    assert count_dots(eval_hlo) == 1
