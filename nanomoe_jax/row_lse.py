"""The log-sum-exp of each row of a logits chunk and its target's logit, in one read.

XLA reduces a row twice for ``jax.nn.logsumexp`` (its max, then the sum of exponentials), so
the loss read each (8192, V) chunk of bf16 logits three times in all, the softmax gradient's
pass included: 0.8 GB a read at V = 50304. On a GPU a Pallas Triton kernel of our own carries
the running max and the rescaled sum across blocks of the row, as flash attention does, in
fp32, and picks the target's logit on the way: one read. Elsewhere (and for the tests' XLA
reference) the same numbers come from ``jax.nn.logsumexp`` on the fp32 logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .gather_gemm import on_gpu

f32 = jnp.float32
BM, BV = 16, 1024  # rows a program, columns a step
INTERPRET = False  # tests run the kernel in Pallas interpret mode


def row_lse(logits_MV, targets_M, use_kernel: bool | None = None):
    """(log-sum-exp of each row, the logit at each row's target), both fp32; ``targets``
    must be valid column indices. ``use_kernel``: None picks the kernel on a GPU."""
    if use_kernel is None:
        use_kernel = on_gpu()
    if not use_kernel:
        x = logits_MV.astype(f32)
        return (jax.nn.logsumexp(x, axis=-1),
                jnp.take_along_axis(x, targets_M[:, None], axis=-1)[:, 0])
    M, V = logits_MV.shape
    out = jax.ShapeDtypeStruct((M,), f32)
    return pl.pallas_call(
        functools.partial(_kernel, V=V), out_shape=[out, out],
        in_specs=[pl.no_block_spec, pl.no_block_spec], out_specs=[pl.no_block_spec] * 2,
        grid=(pl.cdiv(M, BM),), name="row_lse", interpret=INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        metadata={"flops": "0.0"},  # exponentials and sums: no matmul
    )(logits_MV, targets_M.astype(jnp.int32))


def _kernel(x_ref, t_ref, lse_ref, tl_ref, *, V):
    start = pl.program_id(0) * BM
    rows = start + jnp.arange(BM)
    live = rows < x_ref.shape[0]
    t = plgpu.load(t_ref.at[pl.ds(start, BM)], mask=live, other=0)

    def body(j, carry):
        m, s, tl = carry
        cols = j * BV + jnp.arange(BV)
        mask = live[:, None] & (cols < V)[None, :]
        x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask,
                       other=-jnp.inf).astype(f32)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
        tl = tl + jnp.sum(jnp.where(cols[None, :] == t[:, None], x, 0.0), axis=1)
        return m_new, s, tl

    init = (jnp.full((BM,), -jnp.inf, f32), jnp.zeros((BM,), f32), jnp.zeros((BM,), f32))
    m, s, tl = jax.lax.fori_loop(0, pl.cdiv(V, BV), body, init)
    plgpu.store(lse_ref.at[pl.ds(start, BM)], m + jnp.log(s), mask=live)
    plgpu.store(tl_ref.at[pl.ds(start, BM)], tl, mask=live)
