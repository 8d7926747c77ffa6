"""The routed experts as grouped GEMMs that read each expert's weights once: tokamax's
``ragged_dot`` (a maintained Pallas kernel library; its Triton kernels on NVIDIA GPUs), for the
forward and for both gradients, inside our own ``custom_vjp``s so the backward keeps and
re-reads only what it needs: per layer x (N rows), h (N k rows, the compute dtype) and the
experts' output rows for the gates' gradient; the sorted input rows are gathered again from x.

Rows are the (token, expert) assignments stably sorted by expert (``moe.sort_assignments``),
with ``PAD`` pad rows in front, counted in the first expert's group, and ``PAD`` rows behind
in no group at all (a pad reads x's row 0 with a b1 column of 0; see ``_rows``). Why:
tokamax 0.0.12's Triton kernels read up to a block of rows *before* a group's start (weight gradient of an empty group) and up to a block *after* its end (the
forward has no bounds check on rows); with the pads every such read stays inside the buffer,
and a row only ever affects its own output row. The front pad costs PAD / rows of the expert
FLOPs (0.4 % for MoeGPT at B=16, T=1024) and adds nothing to any gradient (its output
cotangent is 0: the combine never reads it); rows behind are never computed nor read back.

The weight gradient of an expert with no rows is set to 0 here: the same kernel accumulates
the block before an empty group's start (NaN in Pallas interpret mode, another expert's rows on
a GPU; tests/test_ragged_gemm.py runs tokamax's Triton kernels in interpret mode on CPU).

Elsewhere than on a GPU the same code runs tokamax's ``xla`` implementation
(``jax.lax.ragged_dot``), which is how the CPU tests check this module's gradients.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp

f32 = jnp.float32
PAD = 128  # >= the largest row block tokamax's Triton ragged dot uses (block_k <= 128)
BIAS_COLS = 16  # b1 as input columns of the first GEMM (see _mlp_forward)


def _tokamax():
    """tokamax, imported on first use. Its options are absl flags that parse ``sys.argv`` when
    first read unless parsed already: train.py's own flags would make that raise. It logs a
    warning per GEMM traced when its autotuning cache has no entry for the shape; we run its
    heuristic tile sizes on purpose (no autotuning), so that line is dropped."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import tokamax

    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _NoCacheMiss) for f in absl_log.filters):
        absl_log.addFilter(_NoCacheMiss())
    return tokamax


class _NoCacheMiss(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Autotuning cache miss")


def unavailable_reason() -> str | None:
    """Why the tokamax dispatch cannot run here (None: it can)."""
    try:
        _tokamax()
    except Exception as e:  # noqa: BLE001 - missing, or broken against this jax
        return f"tokamax does not import ({type(e).__name__}: {e})"
    return None


def implementation() -> str:
    """tokamax's Triton kernels on a GPU (the default device: the plan sets it to the target's
    compile-only device), its XLA reference (``jax.lax.ragged_dot``) anywhere else."""
    from jax.extend.backend import get_default_device

    return "triton" if get_default_device().platform in ("gpu", "cuda") else "xla"


def _precision(dtype):
    """fp32 operands multiply in fp32 (tokamax's default is TF32 there, 1e-4 off)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == f32 else None


@contextlib.contextmanager
def compiling_for(device):
    """Tracing and compiling for ``device`` when it is not this machine's (the deviceless
    plan): tokamax picks kernels by the default device and checks that a GPU is present;
    with the target's compile-only device as default and its cross-compile option on, it
    emits its Triton kernels (with its heuristic block sizes: no autotuning without a GPU)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_device(device))
        if unavailable_reason() is None:
            stack.enter_context(_tokamax().config.cross_compile(True))
        yield


def _dot(lhs_AK, rhs_GKN, counts_G, out_dtype, activation=None):
    """``out[a] = act(lhs[a] @ rhs[group(a)])``: rows grouped by ``counts_G``; fp32
    accumulation, ``activation`` applied to it in the kernel."""
    return _tokamax().ragged_dot(lhs_AK, rhs_GKN, counts_G, precision=_precision(lhs_AK.dtype),
                                 preferred_element_type=out_dtype, activation=activation,
                                 implementation=implementation())


def _wgrad(lhs_AM, rhs_AN, counts_G):
    """``out[g] = lhs[rows of g]^T @ rhs[rows of g]`` in fp32, 0 for a group with no rows."""
    tk = _tokamax()
    nums = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    out = tk.ragged_dot_general(lhs_AM, rhs_AN, counts_G, nums,
                                precision=_precision(lhs_AM.dtype), preferred_element_type=f32,
                                implementation=implementation())
    return jnp.where(counts_G[:, None, None] > 0, out, 0.0)


# --- the combine: a gather both ways (autodiff would scatter-add the transpose) ---------

@jax.custom_vjp
def combine_rows(y_PC, b2_RC, gates_NK, expert_NK, pos_NK, src_P, gates_NR):
    """``out[n] = sum_k gates[n, k] (y[pos[n, k]] + b2[expert[n, k]])`` in fp32 (the original
    weights the experts' outputs in fp32). The output bias is added here, where the rows are
    read anyway, instead of in a pass of its own over the GEMM's output. ``gates_NR``: the
    same gates as a (token, routed expert) matrix, for b2's gradient (a small matmul where a
    segment sum over the rows would scatter)."""
    y_NKC = y_PC[pos_NK].astype(f32) + b2_RC[expert_NK].astype(f32)
    return jnp.einsum("nk,nkc->nc", gates_NK, y_NKC)


def _combine_fwd(y_PC, b2_RC, gates_NK, expert_NK, pos_NK, src_P, gates_NR):
    out = combine_rows(y_PC, b2_RC, gates_NK, expert_NK, pos_NK, src_P, gates_NR)
    return out, (y_PC, b2_RC, gates_NK, expert_NK, pos_NK, src_P, gates_NR)


def _combine_bwd(res, dout_NC):
    y_PC, b2_RC, gates_NK, expert_NK, pos_NK, src_P, gates_NR = res
    K = gates_NK.shape[1]
    # the K gathers of each token's output gradient read it in the rows' dtype (half the
    # bytes in bf16; the rows' gradient is rounded to it anyway)
    # (the barrier: XLA would otherwise fuse the rounding into each gather, reading fp32)
    dout_lo = jax.lax.optimization_barrier(dout_NC.astype(y_PC.dtype))
    y_NKC = y_PC[pos_NK].astype(f32) + b2_RC[expert_NK].astype(f32)
    dgates_NK = jnp.einsum("nc,nkc->nk", dout_lo.astype(f32), y_NKC)
    # pads have gate 0, so their rows' gradient is 0 without a select against a zero array
    # (XLA hoists such an array out of the layer loop and reads it whole every layer)
    src = jnp.maximum(src_P, 0)
    gate_P = jnp.where(src_P >= 0, gates_NK.reshape(-1)[src], 0.0)
    dy_PC = gate_P[:, None] * dout_lo[src // K].astype(f32)
    db2_RC = jnp.einsum("nr,nc->rc", gates_NR, dout_NC)
    return (dy_PC.astype(y_PC.dtype), db2_RC.astype(b2_RC.dtype), dgates_NK,
            None, None, None, None)


combine_rows.defvjp(_combine_fwd, _combine_bwd)


# --- the experts' MLP on the sorted rows ---------------------------------------------------

def _relu2(a):
    return jnp.square(jnp.maximum(a, 0.0))


def _rows(x_NC, src_P, K):
    """The padded sorted rows ``x[src // K]`` with b1's input columns (see ``_mlp_forward``):
    one gather fusion, in the forward and again in the backward: recomputing them from x
    (N rows) is cheaper than keeping them (N K rows) in the layer scan, which copies a kept
    kernel operand in and out of its stack. Pads (``src < 0``) read row 0 with a b1 column
    of 0: their outputs are never read and their output gradient is 0, so they add 0 to
    every weight gradient. (A select against zeros made XLA hoist an (N k, C) zero array out
    of the layer loop and read it whole every layer.)"""
    real_P = src_P >= 0
    rows = x_NC[jnp.maximum(src_P, 0) // K].astype(x_NC.dtype)
    ones = jnp.zeros((src_P.shape[0], BIAS_COLS), x_NC.dtype).at[:, 0].set(real_P)
    return jnp.concatenate([rows, ones], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def expert_mlp(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S):
    """``relu(x[src // K] W1^T + b1)^2 W2^T`` per expert group, on the padded sorted rows
    (no output bias: ``combine_rows`` adds it); ``pos_NK``: each assignment's row. Weights
    are the stacked (E, ...) parameters of all experts; the routed ones are ``[S:]``.
    Passing them whole and casting here means the backward keeps the layer's own parameters
    (which a layer scan does not stack) instead of a bf16 copy of them."""
    return _mlp_forward(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S)[0]


def _mlp_forward(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S):
    """b1 rides in the first GEMM as one more input column (1 on real rows, with
    ``BIAS_COLS - 1`` zero columns to keep rows 16-byte aligned), so the kernel applies relu^2
    to its fp32 accumulator and writes h directly: no pass of its own over (rows, H) for the
    bias and activation, and b1's gradient comes out of W1's (no segment sum). Costs
    BIAS_COLS / C more work in two of the six GEMMs."""
    dt = x_NC.dtype
    w1_RHC, b1_RH = w1_EHC[S:], b1_EH[S:]
    R, H, C = w1_RHC.shape
    w1b_RKH = jnp.concatenate([w1_RHC.mT, b1_RH[:, None, :],
                               jnp.zeros((R, BIAS_COLS - 1, H), w1_RHC.dtype)], axis=1)
    rows_PK = _rows(x_NC, src_P, pos_NK.shape[1])
    h_PH = _dot(rows_PK, w1b_RKH.astype(dt), counts_R, dt, activation=_relu2)
    return _dot(h_PH, w2_ECH[S:].astype(dt).mT, counts_R, dt), h_PH


def _mlp_fwd(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S):
    y_PC, h_PH = _mlp_forward(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S)
    # h only (not relu's input as well): relu(v) = sqrt(h), so relu^2' = 2 sqrt(h)
    return y_PC, (x_NC, src_P, pos_NK, h_PH, counts_R, w1_EHC, b1_EH, w2_ECH)


def _mlp_bwd(S, res, dy_PC):
    x_NC, src_P, pos_NK, h_PH, counts_R, w1_EHC, b1_EH, w2_ECH = res
    dt, C = x_NC.dtype, w1_EHC.shape[2]
    dy_PC = dy_PC.astype(dt)
    dh_PH = _dot(dy_PC, w2_ECH[S:].astype(dt), counts_R, dt)       # W2 is (R, C, H) already
    dv_PH = (dh_PH.astype(f32) * 2.0 * jnp.sqrt(h_PH.astype(f32))).astype(dt)
    drows_PC = _dot(dv_PH, w1_EHC[S:].astype(dt), counts_R, dt)
    # each token's K rows, summed: a gather, not a scatter-add
    dx_NC = drows_PC[pos_NK].astype(f32).sum(1).astype(dt)
    rows_PK = _rows(x_NC, src_P, pos_NK.shape[1])
    dw1b_RHK = _wgrad(dv_PH, rows_PK, counts_R)                    # the parameters' layouts
    dw2_RCH = _wgrad(dy_PC, h_PH, counts_R)

    def full(g_R, p_E):  # the shared experts' rows get their gradient elsewhere
        return jnp.concatenate([jnp.zeros((S, *p_E.shape[1:]), f32), g_R]).astype(p_E.dtype)

    return (dx_NC, None, None, None, full(dw1b_RHK[..., :C], w1_EHC),
            full(dw1b_RHK[..., C], b1_EH), full(dw2_RCH, w2_ECH))


expert_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def routed_experts(x_NC, top_gates_NK, top_idx_NK, gates_NR, s, params, S: int) -> jax.Array:
    """The experts' gated sum per token (fp32), nothing dropped, for the (N, K) assignments
    ``top_idx_NK`` (experts numbered from S) with gates ``top_gates_NK``. ``gates_NR``: the
    gates as a (token, expert >= S) matrix; ``s``: the assignments sorted by expert
    (``moe.sort_assignments``); ``params``: the stacked (fc_weight, fc_bias, proj_weight,
    proj_bias) of all E experts, those used ``[S:]`` (``moe.tokamax_dispatch`` passes S = 0
    and the shared experts as assignments of every token)."""
    w1_EHC, b1_EH, w2_ECH, b2_EC = params
    N, K = top_idx_NK.shape
    i32 = jnp.int32
    pad = jnp.full((PAD,), -1, i32)
    src_P = jnp.concatenate([pad, s.order_A.astype(i32), pad])
    counts_R = s.counts_R.at[0].add(PAD)
    pos_NK = (s.rank_A + PAD).reshape(N, K)
    y_PC = expert_mlp(x_NC, src_P, pos_NK, counts_R, w1_EHC, b1_EH, w2_ECH, S)
    return combine_rows(y_PC, b2_EC[S:], top_gates_NK, top_idx_NK, pos_NK, src_P, gates_NR)
