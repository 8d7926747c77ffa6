"""Grouped GEMMs that gather their rows inside the kernel (ScatterMoE-style), for the MoE
layer's custom VJP (``ragged_gemm.py``): the sorted (token, expert) rows are read from x or
from the output gradient by index, block by block, instead of being written out as an (N j,
C) array first and read back by the GEMM. Pallas Triton kernels of our own (tokamax's
``ragged_dot`` takes dense rows only), in the layout tokamax uses: rows grouped by expert in
``counts_G`` runs, one program per (row block, column block, group) that exits at once when
its block starts past the group's end.

* :func:`gather_dot`: ``out[p] = act(x[idx[p]] @ w[g(p)] + b[g(p)])``;
* :func:`gather_dot_relu2_grad`: the same GEMM with relu^2's gated gradient and the gate's
  gradient in its epilogue (the MoE backward's first GEMM);
* :func:`gather_wgrad`: ``out[g] = a[rows of g]^T b[rows of g]`` with a or b gathered, and
  the column sums of a (a bias's gradient) when asked.

Off a GPU both run as plain XLA: the gathered rows
written out and ``jax.lax.ragged_dot``; tests/test_gather_gemm.py runs the Triton kernels in
Pallas interpret mode against that. Each kernel states its FLOPs and the bytes of its
gathered operand (the rows it reads, not the table) in its metadata for the plan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32
BM, BK, BN = 64, 32, 128  # gather_dot: rows, contraction, columns per block
WM, WN, WR = 64, 64, 32   # gather_wgrad: output block and rows per step
INTERPRET = False  # tests run the kernels in Pallas interpret mode
# the MoE's width C and hidden width H every kernel's blocks divide (execution_options
# refuses the tokamax dispatch on a GPU otherwise)
C_MULTIPLE, H_MULTIPLE = 64, 128


def fits(C: int, H: int) -> bool:
    return C % C_MULTIPLE == 0 and H % H_MULTIPLE == 0


def _bounds(counts_G):
    ends = jnp.cumsum(counts_G).astype(jnp.int32)
    return ends - counts_G.astype(jnp.int32), ends


def _meta(flops: float, operand: int, gathered_bytes: float) -> dict:
    """For the plan (benchmarks/hlo_flops.py): FLOPs, and the gathered operand's bytes."""
    return {"flops": str(float(flops)), "kind": "grouped-gemm", "gathered_operand": str(operand),
            "gathered_bytes": str(float(gathered_bytes))}


def matmul_precision(dtype):
    """fp32 operands multiply in fp32 (the GPU default for fp32 is TF32, 1e-4 off)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == f32 else None


def on_gpu() -> bool:
    """The default device is a GPU, where our Pallas Triton kernels run (the deviceless plan
    makes the target's compile-only device the default)."""
    from jax.extend.backend import get_default_device

    return get_default_device().platform in ("gpu", "cuda")


def relu2(a):
    """relu^2 inside a kernel's epilogue (forward only: activations.relu_squared is a
    custom_vjp, which the Pallas lowering does not take)."""
    return jnp.square(jnp.maximum(a, 0.0))


def _row_groups(counts_G, P):
    """Each row's group; G for rows after the last group (no group)."""
    return jnp.searchsorted(jnp.cumsum(counts_G), jnp.arange(P), side="right")


# --- out[p] = act(x[idx[p]] @ w[g(p)] + b[g(p)]) ---------------------------------------------

def gather_dot(x_NI, idx_P, w, counts_G, out_dtype, bias_GO=None, activation=None,
               w_nk=False, use_kernel=False):
    """Rows ``x[idx[p]]`` times their group's weights, fp32 accumulation, plus the group's
    bias and ``activation`` on the accumulator. ``idx_P``: a row of x for every output row
    (the rows of group g are the ``counts_G[g]`` after the previous groups'). ``w``: (G, K, N),
    or (G, N, K) with ``w_nk``: a layer's parameters as they are stored, in any dtype: the
    kernel casts each block to x's dtype as it loads it (no transposed or cast copy)."""
    K, G, P = x_NI.shape[1], w.shape[0], idx_P.shape[0]
    N = w.shape[1] if w_nk else w.shape[2]
    if use_kernel and (K % BK or N % BN):
        raise ValueError(f"gather_dot's kernel needs K % {BK} == N % {BN} == 0, not {K}, {N}")
    if not use_kernel:
        w_GIO = (w.mT if w_nk else w).astype(x_NI.dtype)
        acc = jax.lax.ragged_dot(x_NI[idx_P], w_GIO, counts_G,
                                 precision=matmul_precision(x_NI.dtype), preferred_element_type=f32)
        if bias_GO is not None:
            acc = acc + bias_GO[_row_groups(counts_G, P)].astype(f32)
        return (activation(acc) if activation else acc).astype(out_dtype)
    lo_G, hi_G = _bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(BM, jnp.int32)])  # last block
    bias = jnp.zeros((G, N), f32) if bias_GO is None else bias_GO
    kernel = functools.partial(_gather_dot_kernel, activation=activation, w_nk=w_nk,
                               precision=matmul_precision(x_NI.dtype))
    w_spec = (pl.BlockSpec((None, BN, K), lambda i, j, g: (g, j, 0)) if w_nk
              else pl.BlockSpec((None, K, BN), lambda i, j, g: (g, 0, j)))
    item = jnp.dtype(x_NI.dtype).itemsize
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((P, N), out_dtype),
        in_specs=[pl.no_block_spec, pl.no_block_spec, w_spec,
                  pl.BlockSpec((None, BN), lambda i, j, g: (g, j)),
                  pl.BlockSpec((None,), lambda i, j, g: (g,)),
                  pl.BlockSpec((None,), lambda i, j, g: (g,))],
        out_specs=pl.BlockSpec((P, BN), lambda i, j, g: (0, j)),
        grid=(pl.cdiv(P, BM), N // BN, G), name="gather_dot", interpret=INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        metadata=_meta(2.0 * P * K * N, 0, P * K * item),
    )(x_NI, idx, w, bias, lo_G, hi_G)


def _gathered_acc(x_ref, idx_ref, w_ref, start, *, w_nk, precision):
    """The fp32 (BM, BN) block of ``x[idx[start:start + BM]] @ w`` (w a group's (K, BN) or,
    with ``w_nk``, (BN, K) block, cast to x's dtype as it is loaded): both kernels' GEMM."""
    rows_B = plgpu.load(idx_ref.at[pl.ds(start, BM)])

    def body(i, acc):
        cols = i * BK + jnp.arange(BK)
        a = plgpu.load(x_ref.at[rows_B[:, None], cols[None, :]])
        if w_nk:
            w = plgpu.load(w_ref.at[:, pl.ds(i * BK, BK)]).astype(a.dtype).T
        else:
            w = plgpu.load(w_ref.at[pl.ds(i * BK, BK), :]).astype(a.dtype)
        return acc + plgpu.dot(a, w, precision=precision)

    return jax.lax.fori_loop(0, x_ref.shape[1] // BK, body, jnp.zeros((BM, BN), f32))


def _gather_dot_kernel(x_ref, idx_ref, w_ref, b_ref, lo_ref, hi_ref, o_ref, *, activation,
                       w_nk, precision):
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    start = lo + pl.program_id(0) * BM

    @pl.when(start < hi)
    def _():
        acc = _gathered_acc(x_ref, idx_ref, w_ref, start, w_nk=w_nk, precision=precision)
        acc = acc + plgpu.load(b_ref).astype(f32)[None, :]
        if activation is not None:
            acc = activation(acc)
        mask = (start + jnp.arange(BM)) < hi
        plgpu.store(o_ref.at[pl.ds(start, BM), :], acc.astype(o_ref.dtype), mask=mask[:, None])


# --- the relu^2 backward on the same rows: dv = g * (x[idx] @ w) * 2 sqrt(h) ----------------

def gather_dot_relu2_grad(x_NI, idx_P, w, counts_G, h_PN, gate_P, use_kernel=False):
    """The MoE backward's first GEMM with its elementwise tail in the epilogue: ``d =
    x[idx[p]] @ w[g(p)]`` (fp32 accumulator), then ``dv = gate * d * 2 sqrt(h)`` in h's dtype
    (relu^2's gradient through h = relu(u)^2, gated) and ``dg = sum(d * h)`` per row (the
    gate's gradient, before its bias term). The accumulator never leaves the kernel: no (P, N)
    array of d is written and read back. ``gate_P``: a gate per row, or (P, S) a gate per row
    and per run of N / S columns (S experts side by side; ``dg`` then per expert). ``dg``
    comes as column-block partial sums on the kernel path; :func:`relu2_grad_rows` sums them."""
    K, G, P, N = x_NI.shape[1], w.shape[0], idx_P.shape[0], w.shape[2]
    gate_PS = (gate_P[:, None] if gate_P.ndim == 1 else gate_P).astype(f32)
    S = gate_PS.shape[1]
    if not use_kernel:
        d = jax.lax.ragged_dot(x_NI[idx_P], w.astype(x_NI.dtype), counts_G,
                               precision=matmul_precision(x_NI.dtype), preferred_element_type=f32)
        h = h_PN.astype(f32)
        dv = jnp.repeat(gate_PS, N // S, axis=1) * d * 2.0 * jnp.sqrt(h)
        return dv.astype(h_PN.dtype), jnp.sum((d * h).reshape(P, S, -1), -1).T
    if K % BK or N % (BN * S):
        raise ValueError(f"gather_dot's kernel needs K % {BK} == N % ({BN} S) == 0, not {K}, "
                         f"{N} (S = {S})")
    lo_G, hi_G = _bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(BM, jnp.int32)])
    gate = jnp.concatenate([gate_PS, jnp.zeros((BM, S), f32)]).T          # (S, P + BM)
    per_gate = N // S // BN  # column blocks per gate
    item = jnp.dtype(x_NI.dtype).itemsize
    kernel = functools.partial(_relu2_grad_kernel, precision=matmul_precision(x_NI.dtype))
    return pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((P, N), h_PN.dtype),
                           jax.ShapeDtypeStruct((N // BN, P), f32)],
        in_specs=[pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((None, K, BN), lambda i, j, g: (g, 0, j)),
                  pl.BlockSpec((P, BN), lambda i, j, g: (0, j)),
                  pl.BlockSpec((None, P + BM), lambda i, j, g: (j // per_gate, 0)),
                  pl.BlockSpec((None,), lambda i, j, g: (g,)),
                  pl.BlockSpec((None,), lambda i, j, g: (g,))],
        out_specs=[pl.BlockSpec((P, BN), lambda i, j, g: (0, j)),
                   pl.BlockSpec((None, P), lambda i, j, g: (j, 0))],
        grid=(pl.cdiv(P, BM), N // BN, G), name="gather_dot_relu2_grad", interpret=INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        metadata=_meta(2.0 * P * K * N, 0, P * K * item),
    )(x_NI, idx, w, h_PN, gate, lo_G, hi_G)


def relu2_grad_rows(dg_parts, S: int | None = None) -> jax.Array:
    """The gate gradients from :func:`gather_dot_relu2_grad`'s partial sums: (P,) for a gate
    per row, (S, P) for ``S`` gates a row."""
    if S is None:
        return jnp.sum(dg_parts, axis=0)
    return jnp.sum(dg_parts.reshape(S, -1, dg_parts.shape[-1]), axis=1)


def _relu2_grad_kernel(x_ref, idx_ref, w_ref, h_ref, gate_ref, lo_ref, hi_ref, dv_ref, dg_ref, *,
                       precision):
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    start = lo + pl.program_id(0) * BM

    @pl.when(start < hi)
    def _():
        acc = _gathered_acc(x_ref, idx_ref, w_ref, start, w_nk=False, precision=precision)
        mask = (start + jnp.arange(BM)) < hi
        h = plgpu.load(h_ref.at[pl.ds(start, BM), :], mask=mask[:, None], other=0).astype(f32)
        gate = plgpu.load(gate_ref.at[pl.ds(start, BM)])
        dv = gate[:, None] * acc * 2.0 * jnp.sqrt(h)
        plgpu.store(dv_ref.at[pl.ds(start, BM), :], dv.astype(dv_ref.dtype), mask=mask[:, None])
        plgpu.store(dg_ref.at[pl.ds(start, BM)], jnp.sum(acc * h, axis=1), mask=mask)


# --- out[g] = a[rows of g]^T b[rows of g], a or b gathered ------------------------------------

def _scaled(rows, scale_P):
    """Rows times their fp32 scale, rounded back to the rows' dtype (as XLA would write it)."""
    return (rows.astype(f32) * scale_P[:, None]).astype(rows.dtype)


def gather_wgrad(a, b, idx_P, counts_G, gathered: str, colsum=False, use_kernel=False,
                 scale_P=None, out_dtype=f32):
    """(G, M, N) ``out_dtype`` (fp32 accumulation): per group, ``a_rows^T b_rows`` where
    ``gathered`` ("a" or "b") is a
    table read at ``idx_P`` and the other is (P, .) in the sorted order; 0 for an empty group.
    ``colsum``: also the (G, M) sums of a's rows, each times its scale when ``scale_P`` is
    given (a bias's gradient: b1's, or b2's from the gated rows). ``scale_P``: an fp32
    scale per row for the sorted (not gathered) operand, applied as its rows are loaded (the
    gates on h for W2's gradient: no gated copy of h is written first)."""
    P, G = idx_P.shape[0], counts_G.shape[0]
    M, N = a.shape[1], b.shape[1]
    if use_kernel and (M % WM or N % WN):
        raise ValueError(f"gather_wgrad's kernel needs M % {WM} == N % {WN} == 0, not {M}, {N}")
    scaled = scale_P is not None
    if not use_kernel:
        a_PM = a[idx_P] if gathered == "a" else _scaled(a, scale_P) if scaled else a
        b_PN = b[idx_P] if gathered == "b" else _scaled(b, scale_P) if scaled else b
        nums = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[])
        out = jax.lax.ragged_dot_general(a_PM, b_PN, counts_G, nums,
                                         precision=matmul_precision(a.dtype),
                                         preferred_element_type=f32).astype(out_dtype)
        a_sum = a_PM.astype(f32) * (scale_P[:, None] if scaled and gathered == "a" else 1.0)
        sums = jax.ops.segment_sum(a_sum, _row_groups(counts_G, P), G)
        return (out, sums) if colsum else out
    lo_G, hi_G = _bounds(counts_G)
    idx = jnp.concatenate([idx_P.astype(jnp.int32), jnp.zeros(WR, jnp.int32)])
    scale = [jnp.concatenate([scale_P.astype(f32), jnp.zeros(WR, f32)])] if scaled else []
    kernel = functools.partial(_wgrad_kernel, gathered=gathered, scaled=scaled,
                               precision=matmul_precision(a.dtype))
    item = jnp.dtype(a.dtype).itemsize
    out_shape = [jax.ShapeDtypeStruct((G, M, N), out_dtype), jax.ShapeDtypeStruct((G, M), f32)]
    out, sums = pl.pallas_call(
        kernel, out_shape=out_shape,
        in_specs=[pl.no_block_spec] * (3 + len(scale))
        + [pl.BlockSpec((None,), lambda g, i, j: (g,))] * 2,
        out_specs=[pl.BlockSpec((None, WM, WN), lambda g, i, j: (g, i, j)),
                   pl.BlockSpec((None, WM), lambda g, i, j: (g, i))],
        grid=(G, M // WM, N // WN), name="gather_wgrad", interpret=INTERPRET,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        metadata=_meta(2.0 * P * M * N, 0 if gathered == "a" else 1,
                       P * (M if gathered == "a" else N) * item),
    )(a, b, idx, *scale, lo_G, hi_G)
    return (out, sums) if colsum else out


def _wgrad_kernel(a_ref, b_ref, idx_ref, *refs, gathered, scaled, precision):
    scale_ref, (lo_ref, hi_ref, o_ref, s_ref) = (refs[0], refs[1:]) if scaled else (None, refs)
    lo, hi = plgpu.load(lo_ref), plgpu.load(hi_ref)
    cols_a = pl.program_id(1) * WM + jnp.arange(WM)
    cols_b = pl.program_id(2) * WN + jnp.arange(WN)

    def body(t, carry):
        acc, s = carry
        rows = lo + t * WR + jnp.arange(WR)
        real = (rows < hi)[:, None]
        src = plgpu.load(idx_ref.at[pl.ds(lo + t * WR, WR)])
        ra, rb = (src if gathered == "a" else rows), (src if gathered == "b" else rows)
        x = plgpu.load(a_ref.at[ra[:, None], cols_a[None, :]], mask=real, other=0)
        y = plgpu.load(b_ref.at[rb[:, None], cols_b[None, :]], mask=real, other=0)
        xs = x.astype(f32)
        if scaled:  # the sorted operand's rows, times their scale; a's sums scaled too
            scale = plgpu.load(scale_ref.at[pl.ds(lo + t * WR, WR)])
            x, y = (x, _scaled(y, scale)) if gathered == "a" else (_scaled(x, scale), y)
            xs = xs * scale[:, None] if gathered == "a" else x.astype(f32)
        return acc + plgpu.dot(x.T, y, precision=precision), s + jnp.sum(xs, axis=0)

    steps = pl.cdiv(hi - lo, WR)  # 0 for an empty group: its gradient is 0
    acc, s = jax.lax.fori_loop(0, steps, body, (jnp.zeros((WM, WN), f32), jnp.zeros(WM, f32)))
    store_grad_and_sums(o_ref, acc, s_ref, s, pl.program_id(2) == 0)


def store_grad_and_sums(o_ref, acc, s_ref, s, first):
    """A weight-gradient kernel's epilogue: its block of the gradient, rounded to the output's
    dtype, and the bias's sums (fp32), which every column block computes and the ``first``
    writes."""
    plgpu.store(o_ref, acc.astype(o_ref.dtype))

    @pl.when(first)
    def _():
        plgpu.store(s_ref, s)
