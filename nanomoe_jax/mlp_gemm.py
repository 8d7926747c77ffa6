"""The routed experts' forward, both GEMMs in one kernel: ``h = relu(x[idx] W1_e^T + b1_e)^2``
and ``y = h W2_e^T`` for every sorted (token, expert) row, e its expert.

As two kernels (``gather_dot`` then tokamax's ``ragged_dot``) h is written, then read back by
the second GEMM, which also wants W2 as (E, H, C): a transposed copy a micro-batch. Here one
program per block of an expert's rows keeps its (BM, H) block of h on chip: it is written once
(the backward keeps it) and multiplied at once by W2 as the layer stores it, (E, C, H), block
by block of BC output columns. The whole hidden width is one fp32 accumulator, so H is
bounded (:func:`fits`); elsewhere ``ragged_gemm`` runs the two kernels.

Off a GPU the XLA path (rows gathered, ``jax.lax.ragged_dot`` twice) gives the same numbers;
tests/test_mlp_gemm.py runs the kernel in Pallas interpret mode against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import gather_gemm as gg

f32 = jnp.float32
BM, BK, BC = 64, 32, 64  # rows a program; contraction step (first GEMM); columns a step (second)
# H is one Triton block (a power of two): the (BM, H) fp32 accumulator (64 a thread at 8
# warps), and W1's (H, BK) and W2's (BC, H) blocks in shared memory within sm_89's 99 KiB
# (MoeGPT's H = 1024 asked for 162 KiB)
MAX_H = 256


def fits(C: int, H: int) -> bool:
    return H & (H - 1) == 0 and 16 <= H <= MAX_H and C % BC == 0 and C % BK == 0


def expert_mlp(x_NC, idx_P, w1_GHC, b1_GH, w2_GCH, counts_G, use_kernel=False):
    """``(h_PH, y_PC)``, both in x's dtype (fp32 accumulation, bias and relu^2 on it). Weights
    as the layer stores them, in any dtype (cast to x's). Rows after the last group are not
    computed (garbage on the kernel path)."""
    dt = x_NC.dtype
    if not use_kernel:
        h = gg.gather_dot(x_NC, idx_P, w1_GHC, counts_G, dt, b1_GH, gg.relu2, w_nk=True)
        y = jax.lax.ragged_dot(h, w2_GCH.astype(dt).mT, counts_G,
                               precision=gg.matmul_precision(dt), preferred_element_type=f32)
        return h, y.astype(dt)
    (P,), (G, H, C) = idx_P.shape, w1_GHC.shape
    if not fits(C, H):
        raise ValueError(f"expert_mlp's kernel needs H a power of two <= {MAX_H} and "
                         f"C % {BC} == 0, not H={H}, C={C}")
    lo_G, hi_G = gg._bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(BM, jnp.int32)])
    by_group = pl.BlockSpec((None,), lambda i, g: (g,))
    item = jnp.dtype(dt).itemsize
    # fp32 weights (a mesh's, scanned layers'; one device passes them cast once a step,
    # expert_arrays.py) in blocks of half the width: the same bytes of shared memory (whole
    # ones overflowed sm_89's 99 KiB), no cast copy a micro-batch
    narrow = max(1, w1_GHC.dtype.itemsize // 2)
    kernel = functools.partial(_kernel, bk=BK // narrow, bc=BC // narrow,
                               precision=gg.matmul_precision(dt))
    return pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((P, H), dt), jax.ShapeDtypeStruct((P, C), dt)],
        in_specs=[pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((None, H, C), lambda i, g: (g, 0, 0)),
                  pl.BlockSpec((None, H), lambda i, g: (g, 0)),
                  pl.BlockSpec((None, C, H), lambda i, g: (g, 0, 0)), by_group, by_group],
        out_specs=[pl.BlockSpec((P, H), lambda i, g: (0, 0)),
                   pl.BlockSpec((P, C), lambda i, g: (0, 0))],
        grid=(pl.cdiv(P, BM), G), name="expert_mlp", interpret=gg.INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
        metadata=gg._meta(4.0 * P * C * H, 0, P * C * item),
    )(x_NC, idx, w1_GHC, b1_GH, w2_GCH, lo_G, hi_G)


def _kernel(x_ref, idx_ref, w1_ref, b1_ref, w2_ref, lo_ref, hi_ref, h_ref, y_ref, *, bk, bc,
            precision):
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    start = lo + pl.program_id(0) * BM
    C = x_ref.shape[1]

    @pl.when(start < hi)
    def _():
        src = plgpu.load(idx_ref.at[pl.ds(start, BM)])

        def first(i, acc):
            cols = i * bk + jnp.arange(bk)
            a = plgpu.load(x_ref.at[src[:, None], cols[None, :]])
            w = plgpu.load(w1_ref.at[:, pl.ds(i * bk, bk)]).astype(a.dtype)  # (H, bk)
            return acc + plgpu.dot(a, w.T, precision=precision)

        acc = jax.lax.fori_loop(0, C // bk, first, jnp.zeros((BM, h_ref.shape[1]), f32))
        h = gg.relu2(acc + plgpu.load(b1_ref).astype(f32)[None, :]).astype(h_ref.dtype)
        real = ((start + jnp.arange(BM)) < hi)[:, None]
        plgpu.store(h_ref.at[pl.ds(start, BM), :], h, mask=real)

        def second(j, _):
            w = plgpu.load(w2_ref.at[pl.ds(j * bc, bc), :]).astype(h.dtype)  # (bc, H)
            y = plgpu.dot(h, w.T, precision=precision)
            plgpu.store(y_ref.at[pl.ds(start, BM), pl.ds(j * bc, bc)], y.astype(y_ref.dtype),
                        mask=real)
            return 0

        jax.lax.fori_loop(0, C // bc, second, 0)
