"""The MoE backward's two GEMMs that read dv (relu^2's gated gradient), in one kernel.

For every sorted (token, expert) row p of expert e = g(p), ``ragged_gemm._bwd`` needs

* ``drows[p] = dv[p] @ W1_e`` (H -> C; summed per token into dx): tokamax's ``ragged_dot``;
* ``dW1_e = sum_p dv[p]^T x[tok[p]]`` and ``db1_e = sum_p dv[p]``: ``gather_wgrad(..., "b")``.

As two kernels both read dv. Here one program per (expert, block of BC columns of C) walks
the expert's rows once: each block of dv rows feeds both GEMMs while it is on chip, with the
matching columns of the gathered x rows, and W1's gradient accumulates over the walk (H x BC
in fp32, so H is bounded, and the experts must be enough programs: :func:`fits`).
Deterministic: each output written by one program.

Off a GPU, or where it does not fit, ``ragged_gemm`` runs the two kernels (or their XLA
paths); tests/test_dv_gemm.py runs this kernel in Pallas interpret mode against the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import dout_gemm
from . import gather_gemm as gg

f32 = jnp.float32
RB, BC = 32, 64  # rows per step, columns of C per program
MAX_H = 256  # W1's gradient block (H, BC) in fp32: 64 a thread at 8 warps


def fits(C: int, H: int, G: int) -> bool:
    """H one Triton block (a power of two); G experts of C / BC programs each, enough of them
    (``dout_gemm.MIN_PROGRAMS``: a program walks all of its expert's rows)."""
    return (H & (H - 1) == 0 and 16 <= H <= MAX_H and C % BC == 0
            and G * (C // BC) >= dout_gemm.MIN_PROGRAMS)


def dv_grads(dv_PH, x_NC, idx_P, w1_GHC, counts_G, out_dtype=f32, use_kernel=False):
    """``(drows_PC, dw1_GHC, db1_GH)``: drows in dv's dtype (fp32 accumulation), dW1 in
    ``out_dtype`` (its fp32 accumulator rounded once), db1 in fp32. W1 as the layer stores it
    (E, H, C), in any dtype: cast to dv's as it is loaded."""
    dt = dv_PH.dtype
    if not use_kernel:
        drows = jax.lax.ragged_dot(dv_PH, w1_GHC.astype(dt), counts_G,
                                   precision=gg.matmul_precision(dt), preferred_element_type=f32)
        dw1, db1 = gg.gather_wgrad(dv_PH, x_NC, idx_P, counts_G, "b", colsum=True,
                                   out_dtype=out_dtype)
        return drows.astype(dt), dw1, db1
    (P, H), (G, _, C) = dv_PH.shape, w1_GHC.shape
    if not fits(C, H, G):
        raise ValueError(f"dv_grads' kernel needs H a power of two <= {MAX_H}, C % {BC} == 0 "
                         f"and G C / {BC} >= {dout_gemm.MIN_PROGRAMS}, not H={H}, C={C}, G={G}")
    lo_G, hi_G = gg._bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(RB, jnp.int32)])
    item = jnp.dtype(dt).itemsize
    kernel = functools.partial(_kernel, precision=gg.matmul_precision(dt))
    by_group = pl.BlockSpec((None,), lambda g, j: (g,))
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((P, C), dt), jax.ShapeDtypeStruct((G, H, C), out_dtype),
                   jax.ShapeDtypeStruct((G, H), f32)],
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((None, H, BC), lambda g, j: (g, 0, j)), by_group, by_group],
        out_specs=[pl.BlockSpec((P, BC), lambda g, j: (0, j)),
                   pl.BlockSpec((None, H, BC), lambda g, j: (g, 0, j)),
                   pl.BlockSpec((None, H), lambda g, j: (g, 0))],
        grid=(G, C // BC), name="dv_gemm", interpret=gg.INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
        metadata=gg._meta(4.0 * P * C * H, 1, P * C * item),
    )(dv_PH, x_NC, idx, w1_GHC, lo_G, hi_G)


def _kernel(dv_ref, x_ref, idx_ref, w_ref, lo_ref, hi_ref, drows_ref, dw_ref, db_ref, *,
            precision):
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    H = dv_ref.shape[1]
    cols = pl.program_id(1) * BC + jnp.arange(BC)
    w_HB = plgpu.load(w_ref).astype(dv_ref.dtype)  # this program's W1 columns, read once

    def body(t, carry):
        acc_HB, s_H = carry
        start = lo + t * RB
        real = ((start + jnp.arange(RB)) < hi)[:, None]
        src = plgpu.load(idx_ref.at[pl.ds(start, RB)])
        dv_RH = plgpu.load(dv_ref.at[pl.ds(start, RB), :], mask=real, other=0)
        x_RB = plgpu.load(x_ref.at[src[:, None], cols[None, :]], mask=real, other=0)
        drows = plgpu.dot(dv_RH, w_HB, precision=precision)
        plgpu.store(drows_ref.at[pl.ds(start, RB), :], drows.astype(drows_ref.dtype), mask=real)
        acc_HB = acc_HB + plgpu.dot(dv_RH.T, x_RB.astype(dv_RH.dtype), precision=precision)
        return acc_HB, s_H + jnp.sum(dv_RH.astype(f32), axis=0)

    steps = pl.cdiv(hi - lo, RB)  # 0 for an empty expert: its gradients are 0
    acc, s = jax.lax.fori_loop(0, steps, body, (jnp.zeros((H, BC), f32), jnp.zeros(H, f32)))
    gg.store_grad_and_sums(dw_ref, acc, db_ref, s, pl.program_id(1) == 0)
