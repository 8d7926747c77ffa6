"""The MoE backward's fused pass over dv (nanomoe_jax/dv_gemm.py): its Triton kernel in
Pallas interpret mode against the XLA path (a ragged GEMM and gather_wgrad) and against the
GEMMs written out in float64, fp32 and bf16, with uneven experts, an empty one, one of a
single row and row counts that are no multiple of the kernel's row block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import dv_gemm as dvg

from kernel_cases import COUNTS, P, close, interpreted  # noqa: F401 - a fixture

T, C, H = 24, 128, 64  # C: two of the kernel's column blocks


def inputs(seed: int, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    dv = jax.random.normal(k[0], (P, H)).astype(dtype)
    x = jax.random.normal(k[1], (T, C)).astype(dtype)
    idx = jax.random.randint(k[2], (P,), 0, T)
    w1 = jax.random.normal(k[3], (5, H, C)) / np.sqrt(H)  # (E, H, C) as stored
    return dv, x, idx, w1


def written_out(dv, x, idx, w1):
    dv, x, w1 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (dv, x, w1))
    idx, ends = np.asarray(idx), np.cumsum(np.asarray(COUNTS))
    drows, dw1, db1 = np.zeros((P, C)), np.zeros((5, H, C)), np.zeros((5, H))
    lo = 0
    for e, hi in enumerate(ends):
        drows[lo:hi] = dv[lo:hi] @ w1[e]
        dw1[e] = dv[lo:hi].T @ x[idx[lo:hi]]
        db1[e] = dv[lo:hi].sum(0)
        lo = hi
    return drows, dw1, db1


def test_kernel_equals_the_gemms_in_fp32(interpreted):
    args = inputs(0, jnp.float32)
    want = written_out(*args)
    assert all(float(np.abs(w).max()) > 0.5 for w in want)
    for use_kernel in (False, True):
        got = dvg.dv_grads(*args, COUNTS, use_kernel=use_kernel)
        assert [g.shape for g in got] == [(P, C), (5, H, C), (5, H)]
        for g, w in zip(got, want):
            close(g, w, 1e-5)
        assert float(jnp.abs(got[1][1]).max()) == 0.0 and float(jnp.abs(got[2][1]).max()) == 0.0


def test_kernel_in_bf16_matches_the_xla_path(interpreted):
    """bf16 rows, W1 cast to bf16 as it loads, dW1 rounded once to bf16; db1 in fp32."""
    args = inputs(1, jnp.bfloat16)
    sep = dvg.dv_grads(*args, COUNTS, out_dtype=jnp.bfloat16)
    got = dvg.dv_grads(*args, COUNTS, out_dtype=jnp.bfloat16, use_kernel=True)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for g, s, w in zip(got, sep, written_out(*args)):
        close(g, np.asarray(jnp.asarray(s, jnp.float32), np.float64), 1e-2)
        close(g, w, 2e-2)
    close(got[2], np.asarray(sep[2], np.float64), 1e-5)


def test_fits_needs_h_a_power_of_two_that_the_accumulator_holds_and_enough_programs():
    assert dvg.fits(512, 256, 64) and dvg.fits(768, 128, 64)
    assert not dvg.fits(512, 1024, 64) and not dvg.fits(512, 384, 64)
    assert not dvg.fits(520, 256, 64)
    assert not dvg.fits(512, 256, 8)      # 8 experts a device: 64 programs
    with pytest.raises(ValueError, match="H a power of two"):
        dvg.dv_grads(jnp.ones((3, 512)), jnp.ones((4, 64)), jnp.zeros(3, jnp.int32),
                     jnp.ones((1, 512, 64)), jnp.array([3]), use_kernel=True)
