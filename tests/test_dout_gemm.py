"""The MoE backward's fused pass over the output gradient's gathered rows
(nanomoe_jax/dout_gemm.py): its Triton kernel in Pallas interpret mode against the two
kernels it replaces (gather_dot_relu2_grad and gather_wgrad, through their XLA paths) and
against the GEMMs written out, in fp32 and bf16, with uneven experts, an empty one, pad rows
(gate 0) and row counts that are no multiple of the kernel's row block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import dout_gemm as dg

from kernel_cases import COUNTS, P, close, interpreted  # noqa: F401 - a fixture

T, C, H = 24, 64, 96  # H: three of the kernel's hidden blocks


def inputs(seed: int, dtype):
    k = jax.random.split(jax.random.key(seed), 5)
    dout = jax.random.normal(k[0], (T, C))
    idx = jax.random.randint(k[1], (P,), 0, T)
    w2 = jax.random.normal(k[2], (5, C, H)) / np.sqrt(C)
    h = jnp.square(jax.random.normal(k[3], (P, H)))  # relu^2 outputs: >= 0
    gate = jax.random.uniform(k[4], (P,), minval=0.1, maxval=1.0)
    gate = gate.at[::7].set(0.0)  # pad rows
    return dout.astype(dtype), idx, w2, h.astype(dtype), gate


def written_out(dout, idx, w2, h, gate):
    """float64 numpy: the GEMMs expert by expert."""
    dout, w2, h, gate = (np.asarray(a, np.float64) for a in (dout.astype(jnp.float32), w2,
                                                            h.astype(jnp.float32), gate))
    idx, ends = np.asarray(idx), np.cumsum(np.asarray(COUNTS))
    dv, dgate = np.zeros((P, H)), np.zeros(P)
    dw2, db2 = np.zeros((5, C, H)), np.zeros((5, C))
    lo = 0
    for e, hi in enumerate(ends):
        rows = dout[idx[lo:hi]]
        d = rows @ w2[e]
        dv[lo:hi] = gate[lo:hi, None] * d * 2.0 * np.sqrt(h[lo:hi])
        dgate[lo:hi] = np.sum(d * h[lo:hi], axis=1)
        dw2[e] = rows.T @ (gate[lo:hi, None] * h[lo:hi])
        db2[e] = (gate[lo:hi, None] * rows).sum(0)
        lo = hi
    return dv, dgate, dw2, db2


def test_fused_kernel_equals_the_gemms_in_fp32(interpreted):
    args = inputs(0, jnp.float32)
    want = written_out(*args)
    assert all(float(np.abs(w).max()) > 0.5 for w in want)
    for use_kernel in (False, True):
        got = dg.relu2_grad_wgrad(*args[:2], args[2], COUNTS, *args[3:], use_kernel=use_kernel)
        assert [g.shape for g in got] == [(P, H), (P,), (5, C, H), (5, C)]
        for g, w in zip(got, want):
            close(g, w, 1e-5)
        assert float(jnp.abs(got[2][1]).max()) == 0.0 and float(jnp.abs(got[3][1]).max()) == 0.0


def test_fused_kernel_in_bf16_matches_the_two_kernels_it_replaces(interpreted):
    """bf16 rows, weights cast to bf16 as they load, dW2 rounded once to bf16: the fused
    kernel against the separate kernels' XLA paths (the same roundings), and both against
    float64 within bf16's error."""
    args = inputs(1, jnp.bfloat16)
    want64 = written_out(*args)
    sep = dg.relu2_grad_wgrad(*args[:2], args[2], COUNTS, *args[3:], out_dtype=jnp.bfloat16)
    got = dg.relu2_grad_wgrad(*args[:2], args[2], COUNTS, *args[3:], out_dtype=jnp.bfloat16,
                              use_kernel=True)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.float32]
    for g, s, w in zip(got, sep, want64):
        close(g, np.asarray(jnp.asarray(s, jnp.float32), np.float64), 1e-2)
        close(g, w, 2e-2)
    # the fp32 outputs (the gates' and b2's gradients) agree far closer than bf16's step
    close(got[1], np.asarray(sep[1], np.float64), 1e-5)
    close(got[3], np.asarray(sep[3], np.float64), 1e-5)


def test_fits_needs_a_power_of_two_width_whole_hidden_blocks_and_enough_programs():
    assert dg.fits(512, 256, 64) and dg.fits(512, 2048, 8)   # MoeGPT-64's 64 experts
    assert not dg.fits(768, 256, 64)       # no power of two
    assert not dg.fits(1024, 256, 64)      # the rows' block too large for sm_89
    assert not dg.fits(512, 100, 64)       # H not whole blocks
    assert not dg.fits(512, 1024, 4)       # MoeGPT: 128 programs, each an expert's long walk
    assert not dg.fits(512, 256, 8)        # 8 experts a device (an expert=8 mesh): 64


def test_separate_runs_the_two_kernels_with_the_same_numbers(interpreted, monkeypatch):
    """``separate`` (what ragged_gemm asks for where the fused kernel does not fit, e.g. C =
    768, GPT-2's width): the two kernels, the same numbers as the fused kernel's XLA path;
    without it, a size the kernel does not take is refused."""
    calls, original = [], dg.pl.pallas_call
    monkeypatch.setattr(dg.pl, "pallas_call",
                        lambda *a, **k: calls.append(k.get("name")) or original(*a, **k))
    k = jax.random.split(jax.random.key(2), 4)
    dout = jax.random.normal(k[0], (T, 768))
    w2 = jax.random.normal(k[1], (5, 768, 128)) / 28.0
    h = jnp.square(jax.random.normal(k[2], (P, 128)))
    idx = jax.random.randint(k[3], (P,), 0, T)
    gate = jnp.full((P,), 0.5)
    got = dg.relu2_grad_wgrad(dout, idx, w2, COUNTS, h, gate, use_kernel=True, separate=True)
    want = dg.relu2_grad_wgrad(dout, idx, w2, COUNTS, h, gate)
    assert sorted(calls) == ["gather_dot_relu2_grad", "gather_wgrad"]
    for g, w in zip(got, want):
        close(g, np.asarray(w, np.float64), 1e-5)
    with pytest.raises(ValueError, match="C a power of two <= 512"):
        dg.relu2_grad_wgrad(dout, idx, w2, COUNTS, h, gate, use_kernel=True)
