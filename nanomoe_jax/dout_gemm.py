"""The MoE backward's two GEMMs that read the output gradient's gathered rows, in one kernel.

``ragged_gemm._bwd`` needs, for every sorted (token, expert) row p of expert e = g(p):

* ``d = dout[tok[p]] @ W2_e`` (C -> H), and from it relu^2's gated gradient ``dv = gate * d *
  2 sqrt(h)`` and the gate's gradient ``dg = sum(d * h)``: ``gather_dot_relu2_grad``;
* ``dW2_e = sum_p dout[tok[p]]^T (gate h)[p]`` and ``db2_e = sum_p gate dout[tok[p]]``:
  ``gather_wgrad(..., "a", scale_P=gate)``.

As two kernels each gathers the same (P, C) rows of the output gradient and reads the same
(P, H) rows of h. Here one program per (expert, block of HB hidden columns) walks the expert's
rows once: each gathered block of dout feeds both GEMMs while it is on chip, and W2's gradient
accumulates over the walk (C x HB in fp32, so C is bounded: :func:`fits`; and the experts must
be enough programs). Deterministic: no atomics, each output written by one program.

``ragged_gemm`` picks it on a GPU where it fits; elsewhere the two kernels (``separate``) or
their XLA paths run, with the same numbers. tests/test_dout_gemm.py runs this kernel in Pallas
interpret mode against them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import gather_gemm as gg

f32 = jnp.float32
RB, HB = 32, 32  # rows per step, hidden columns per program
# W2's gradient block (C, HB) in registers (64 fp32 a thread at 8 warps), the gathered rows'
# (RB, C) block in shared memory: at C = 1024 sm_89 was asked for 134 KiB of its 99
MAX_C = 512
# a program walks all of one expert's rows: with fewer programs than two an SM of an H100
# (132), the longest walk is the kernel (MoeGPT, 4 experts of H 1024: 128 programs of 11-16k
# rows each; an expert mesh of 8 MoeGPT-64 experts a device: 64), where the two kernels split
# every expert's rows into blocks
MIN_PROGRAMS = 256


def fits(C: int, H: int, G: int) -> bool:
    """Triton blocks are powers of two: the whole width C is one block; G experts."""
    return (C & (C - 1) == 0 and 16 <= C <= MAX_C and H % HB == 0
            and G * (H // HB) >= MIN_PROGRAMS)


def relu2_grad_wgrad(dout_NC, idx_P, w2_GCH, counts_G, h_PH, gate_P, out_dtype=f32,
                     use_kernel=False, separate=False):
    """``(dv_PH, dg_P, dw2_GCH, db2_GC)`` as above: dv in h's dtype, dg and db2 in fp32, dW2
    in ``out_dtype`` (its fp32 accumulator rounded once). ``gate_P``: 0 on pad rows. Without
    ``use_kernel``: the two kernels' XLA paths (or, with ``separate``, the two kernels)."""
    C, H, G = dout_NC.shape[1], h_PH.shape[1], w2_GCH.shape[0]
    if not use_kernel or separate:
        dv, dg_parts = gg.gather_dot_relu2_grad(dout_NC, idx_P, w2_GCH, counts_G, h_PH, gate_P,
                                                use_kernel=use_kernel)
        dw2, db2 = gg.gather_wgrad(dout_NC, h_PH, idx_P, counts_G, "a", colsum=True,
                                   use_kernel=use_kernel, scale_P=gate_P, out_dtype=out_dtype)
        return dv, gg.relu2_grad_rows(dg_parts), dw2, db2
    if not fits(C, H, G):
        raise ValueError(f"relu2_grad_wgrad's kernel needs C a power of two <= {MAX_C}, "
                         f"H % {HB} == 0 and G H / {HB} >= {MIN_PROGRAMS}, not C={C}, H={H}, "
                         f"G={G}")
    P = idx_P.shape[0]
    lo_G, hi_G = gg._bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(RB, jnp.int32)])
    gate = jnp.concatenate([gate_P.astype(f32), jnp.zeros(RB, f32)])
    item = jnp.dtype(dout_NC.dtype).itemsize
    kernel = functools.partial(_kernel, precision=gg.matmul_precision(dout_NC.dtype))
    by_group = pl.BlockSpec((None,), lambda g, j: (g,))
    dv, dg_parts, dw2, db2 = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((P, H), h_PH.dtype),
                   jax.ShapeDtypeStruct((H // HB, P), f32),
                   jax.ShapeDtypeStruct((G, C, H), out_dtype),
                   jax.ShapeDtypeStruct((G, C), f32)],
        in_specs=[pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((None, C, HB), lambda g, j: (g, 0, j)),
                  pl.BlockSpec((P, HB), lambda g, j: (0, j)),
                  pl.no_block_spec, by_group, by_group],
        out_specs=[pl.BlockSpec((P, HB), lambda g, j: (0, j)),
                   pl.BlockSpec((None, P), lambda g, j: (j, 0)),
                   pl.BlockSpec((None, C, HB), lambda g, j: (g, 0, j)),
                   pl.BlockSpec((None, C), lambda g, j: (g, 0))],
        grid=(G, H // HB), name="dout_gemm", interpret=gg.INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
        metadata=gg._meta(4.0 * P * C * H, 0, P * C * item),
    )(dout_NC, idx, w2_GCH, h_PH, gate, lo_G, hi_G)
    return dv, jnp.sum(dg_parts, axis=0), dw2, db2


def _kernel(x_ref, idx_ref, w_ref, h_ref, gate_ref, lo_ref, hi_ref, dv_ref, dg_ref, dw_ref,
            db_ref, *, precision):
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    C = x_ref.shape[1]
    w_CB = plgpu.load(w_ref).astype(x_ref.dtype)  # this program's W2 columns, read once

    def body(t, carry):
        acc_CB, s_C = carry
        start = lo + t * RB
        real = (start + jnp.arange(RB)) < hi
        src = plgpu.load(idx_ref.at[pl.ds(start, RB)])
        d_RC = plgpu.load(x_ref.at[src[:, None], jnp.arange(C)[None, :]], mask=real[:, None],
                          other=0)
        h_RB = plgpu.load(h_ref.at[pl.ds(start, RB), :], mask=real[:, None], other=0)
        gate_R = plgpu.load(gate_ref.at[pl.ds(start, RB)])
        # dout W2 stays in registers: relu^2's gated gradient and the gate's from it
        dw2h_RB = plgpu.dot(d_RC, w_CB, precision=precision)
        hf = h_RB.astype(f32)
        dv = gate_R[:, None] * dw2h_RB * 2.0 * jnp.sqrt(hf)
        plgpu.store(dv_ref.at[pl.ds(start, RB), :], dv.astype(dv_ref.dtype), mask=real[:, None])
        plgpu.store(dg_ref.at[pl.ds(start, RB)], jnp.sum(dw2h_RB * hf, axis=1), mask=real)
        # the gated h rounded to its dtype, as gather_wgrad's scale_P does
        gh_RB = (hf * gate_R[:, None]).astype(h_RB.dtype)
        acc_CB = acc_CB + plgpu.dot(d_RC.T, gh_RB, precision=precision)
        return acc_CB, s_C + jnp.sum(d_RC.astype(f32) * gate_R[:, None], axis=0)

    steps = pl.cdiv(hi - lo, RB)  # 0 for an empty expert: its gradients are 0
    acc, s = jax.lax.fori_loop(0, steps, body,
                               (jnp.zeros((C, dw_ref.shape[1]), f32), jnp.zeros(C, f32)))
    gg.store_grad_and_sums(dw_ref, acc, db_ref, s, pl.program_id(1) == 0)
