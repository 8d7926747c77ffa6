"""The routed experts' forward in one kernel (nanomoe_jax/mlp_gemm.py): its Triton kernel in
Pallas interpret mode against the XLA path (rows gathered, two ragged GEMMs) and against the
MLP written out in float64, fp32 and bf16, with uneven experts, an empty one, one of a single
row and rows that are no multiple of the kernel's row block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import mlp_gemm as mg

from kernel_cases import COUNTS, P, close, groups, interpreted  # noqa: F401 - a fixture

T, C, H = 24, 128, 64


def inputs(seed: int, dtype):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (T, C)).astype(dtype)
    idx = jax.random.randint(k[1], (P,), 0, T)
    w1 = jax.random.normal(k[2], (5, H, C)) / np.sqrt(C)   # (E, H, C) as stored
    b1 = 0.3 * jax.random.normal(k[3], (5, H))
    w2 = jax.random.normal(k[4], (5, C, H)) / np.sqrt(H)   # (E, C, H) as stored
    return x, idx, w1, b1, w2


def written_out(x, idx, w1, b1, w2):
    x, w1, b1, w2 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64)
                     for a in (x, w1, b1, w2))
    g = groups()
    u = np.einsum("pc,phc->ph", x[np.asarray(idx)], w1[g]) + b1[g]
    h = np.square(np.maximum(u, 0.0))
    return h, np.einsum("ph,pch->pc", h, w2[g])


def test_kernel_equals_the_two_gemms_in_fp32(interpreted):
    args = inputs(0, jnp.float32)
    want = written_out(*args)
    assert float(np.abs(want[1]).max()) > 0.5
    for use_kernel in (False, True):
        h, y = mg.expert_mlp(*args, COUNTS, use_kernel=use_kernel)
        assert h.shape == (P, H) and y.shape == (P, C) and y.dtype == jnp.float32
        close(h, want[0], 1e-5)
        close(y, want[1], 1e-5)


@pytest.mark.parametrize("weights", [jnp.float32, jnp.bfloat16])
def test_kernel_in_bf16_rounds_h_once_as_the_two_kernels_do(interpreted, weights):
    """bf16: h rounded to bf16 and the second GEMM fed the rounded h, as the two kernels
    (gather_dot writing h, the ragged GEMM reading it) do; weights cast as they load: fp32
    ones (a mesh's) in blocks half as wide as bf16 ones (one device's, cast once a step)."""
    x, idx, w1, b1, w2 = inputs(1, jnp.bfloat16)
    args = (x, idx, w1.astype(weights), b1, w2.astype(weights))
    h_ref, y_ref = mg.expert_mlp(*args, COUNTS)
    h, y = mg.expert_mlp(*args, COUNTS, use_kernel=True)
    assert h.dtype == y.dtype == jnp.bfloat16
    close(h, np.asarray(h_ref.astype(jnp.float32), np.float64), 1e-2)
    close(y, np.asarray(y_ref.astype(jnp.float32), np.float64), 1e-2)
    want = written_out(*args)
    close(y, want[1], 3e-2)


def test_fits_needs_h_a_power_of_two_that_the_accumulator_holds():
    assert mg.fits(512, 256) and mg.fits(768, 64)
    assert not mg.fits(512, 1024)   # MoeGPT's H: the two kernels
    assert not mg.fits(512, 384)
    assert not mg.fits(520, 256)
    with pytest.raises(ValueError, match="H a power of two"):
        mg.expert_mlp(jnp.ones((4, 64)), jnp.zeros(3, jnp.int32), jnp.ones((1, 96, 64)),
                      jnp.ones((1, 96)), jnp.ones((1, 64, 96)), jnp.array([3]), use_kernel=True)
