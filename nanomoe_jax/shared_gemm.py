"""The S shared experts as one dense MLP of width F = S*H, with its own VJP: every token uses
every shared expert, so their rows need no gather, and their sum over the S experts is the
second GEMM's contraction (the gates scale h's columns, expert by expert).

As S more rows a token of the grouped GEMMs (``ragged_gemm.experts``), the shared experts read
x and the output gradient S times each and wrote S output rows a token, summed back in passes
of their own (forward and dx). Here each is read once and the outputs are (N, C). The first
GEMM and the backward's first take their elementwise work in the kernel epilogue, as the
grouped path does (``gather_dot``: bias and relu^2; ``gather_dot_relu2_grad``: relu^2's gated
gradient and the gates' gradient, with a gate per expert's run of columns), rows in order;
W1's gradient and b1's come from one ``gather_wgrad``; the other two GEMMs are XLA's. The
backward keeps h alone (the compute dtype). Off a GPU the same code runs in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .gather_gemm import (gather_dot, gather_dot_relu2_grad, gather_wgrad, matmul_precision,
                          relu2, relu2_grad_rows)
from . import ragged_gemm

f32 = jnp.float32


def _gated(h_NF, gates_NS):
    """h with each expert's H columns times the token's gate for it, in h's dtype (as
    ``expert_mlps.shared_experts`` rounds it)."""
    N, S = gates_NS.shape
    return (h_NF.reshape(N, S, -1) * gates_NS[..., None].astype(h_NF.dtype)).reshape(N, -1)


def _w2_CF(w2_SCH):
    """The S experts' W2 side by side, (C, S H), as stored (a small copy a layer)."""
    S, C, H = w2_SCH.shape
    return w2_SCH.transpose(1, 0, 2).reshape(C, S * H)


def _in_order(N: int):
    """Every row, in order, as one group: the gather kernels' rows for a dense operand."""
    return jnp.arange(N, dtype=jnp.int32), jnp.full((1,), N, jnp.int32)


@jax.custom_vjp
def shared_mlp(x_NC, gates_NS, w1_SHC, b1_SH, w2_SCH, b2_SC):
    """``sum_s gates[n, s] (relu(x W1_s^T + b1_s)^2 W2_s^T + b2_s)``, fp32; x in the compute
    dtype, the weights as stored (cast in the kernels)."""
    return _forward(x_NC, gates_NS, w1_SHC, b1_SH, w2_SCH, b2_SC)[0]


def _forward(x_NC, gates_NS, w1_SHC, b1_SH, w2_SCH, b2_SC):
    N, C = x_NC.shape
    S, H, _ = w1_SHC.shape
    dt = x_NC.dtype
    rows, counts = _in_order(N)
    h_NF = gather_dot(x_NC, rows, w1_SHC.reshape(1, S * H, C), counts, dt,
                      b1_SH.reshape(1, S * H), relu2, w_nk=True,
                      use_kernel=ragged_gemm.uses_kernels())
    y_NC = jnp.dot(_gated(h_NF, gates_NS), _w2_CF(w2_SCH).astype(dt).T,
                   precision=matmul_precision(dt), preferred_element_type=f32)
    return y_NC + gates_NS @ b2_SC.astype(f32), h_NF


def _fwd(x_NC, gates_NS, w1_SHC, b1_SH, w2_SCH, b2_SC):
    out, h_NF = _forward(x_NC, gates_NS, w1_SHC, b1_SH, w2_SCH, b2_SC)
    return out, (x_NC, gates_NS, h_NF, w1_SHC, b1_SH, w2_SCH, b2_SC)


def _bwd(res, dout_NC):
    x_NC, gates_NS, h_NF, w1_SHC, b1_SH, w2_SCH, b2_SC = res
    N, S = gates_NS.shape
    H, C = w1_SHC.shape[1:]
    dt, hi, kernel = x_NC.dtype, matmul_precision(x_NC.dtype), ragged_gemm.uses_kernels()
    # the barrier: XLA would otherwise fuse the rounding into each reader, reading fp32
    dout_lo = jax.lax.optimization_barrier(dout_NC.astype(dt))
    # dout W2 stays in the kernel's accumulator: dv and each gate's <dout W2_s, h_s> come
    # out of its epilogue
    rows, counts = _in_order(N)
    dv_NF, dg_parts = gather_dot_relu2_grad(dout_lo, rows, _w2_CF(w2_SCH)[None], counts, h_NF,
                                            gates_NS, use_kernel=kernel)
    # a gate's gradient is <dout, h_s W2_s^T + b2_s>
    dg_NS = (relu2_grad_rows(dg_parts, S).T
             + jnp.dot(dout_lo, b2_SC.astype(dt).T, precision=hi, preferred_element_type=f32))
    # in the compute dtype, as the grouped path's dx rows (an fp32 one was carried through
    # the residual stream's backward fusion)
    dx_NC = jnp.dot(dv_NF, w1_SHC.reshape(S * H, C).astype(dt), precision=hi,
                    preferred_element_type=dt)
    # the weights' gradients in the compute dtype, as on the grouped path
    dw1_1FC, db1_1F = gather_wgrad(dv_NF, x_NC, rows, counts, "b", colsum=True,
                                   use_kernel=kernel, out_dtype=dt)
    dw2_CF = jnp.dot(dout_lo.T, _gated(h_NF, gates_NS), precision=hi, preferred_element_type=dt)
    db2_SC = jnp.dot(gates_NS.T, dout_NC.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return (dx_NC, dg_NS, dw1_1FC.reshape(S, H, C).astype(w1_SHC.dtype),
            db1_1F.reshape(S, H).astype(b1_SH.dtype),
            dw2_CF.reshape(C, S, H).transpose(1, 0, 2).astype(w2_SCH.dtype),
            db2_SC.astype(b2_SC.dtype))


shared_mlp.defvjp(_fwd, _bwd)
