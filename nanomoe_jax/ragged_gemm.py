"""The experts as grouped GEMMs that read each expert's weights once, inside our own
``custom_vjp`` so the backward keeps and re-reads only what it needs: per layer x (N rows) and
h (N j rows, the compute dtype; j = the experts a token uses, shared and routed); the gates'
gradient comes from h, not from kept output rows.
The four GEMMs whose rows are rows of x or of the output gradient gather them in the kernel
(``gather_gemm.py``, Pallas Triton kernels of our own); the two whose rows are h or dv (dense,
in the sorted order) are tokamax's ``ragged_dot`` (a maintained Pallas kernel library). On a
GPU, GEMMs that read the same rows share one kernel where the sizes allow (fine-grained
experts such as MoeGPT-64's, one device): the forward's two, h kept on chip (``mlp_gemm.py``);
the backward's two on the output gradient (``dout_gemm.py``) and its two on dv
(``dv_gemm.py``), each a walk over an expert's rows.

Rows are the (token, expert) assignments stably sorted by expert (``grouped.sort_assignments``),
then ``PAD`` rows in no group at all: tokamax 0.0.12's Triton forward kernel reads up to a
block past a group's end with no bounds check on rows, and the pad keeps that read inside the
buffer (a row only ever affects its own output row; the pad rows are never computed nor read
back). Assignments may also sort past every group (an expert mesh's empty receive slots):
no kernel computes them and they read 0. The gather kernels check their bounds and give an
expert with no rows a gradient of 0.

Elsewhere than on a GPU the same code runs tokamax's ``xla`` implementation and the gathers
as XLA gathers (``jax.lax.ragged_dot``), which is how the CPU tests check this module's
gradients; tests/test_ragged_gemm.py also runs every Triton kernel in interpret mode.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp

from .dout_gemm import fits as dout_fits
from .dout_gemm import relu2_grad_wgrad
from .dv_gemm import dv_grads
from .dv_gemm import fits as dv_fits
from .gather_gemm import gather_dot, gather_wgrad, matmul_precision, on_gpu, relu2
from .grouped import every_token_assignments
from .mlp_gemm import expert_mlp
from .mlp_gemm import fits as mlp_fits

f32 = jnp.float32
PAD = 128  # >= the largest row block tokamax's Triton ragged dot uses (block_k <= 128)


def _tokamax():
    """tokamax, imported on first use. Its options are absl flags that parse ``sys.argv`` when
    first read unless parsed already: train.py's own flags would make that raise, so they are
    marked parsed (the one process-wide change, and only where tokamax is used)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import tokamax

    return tokamax


class _NoCacheMiss(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Autotuning cache miss")


@contextlib.contextmanager
def _no_cache_miss_lines():
    """tokamax logs a warning per GEMM traced when its autotuning cache has no entry for the
    shape; we run its heuristic tile sizes on purpose (no autotuning), so while a GEMM is
    traced that line is dropped."""
    absl_log, quiet = logging.getLogger("absl"), _NoCacheMiss()
    absl_log.addFilter(quiet)
    try:
        yield
    finally:
        absl_log.removeFilter(quiet)


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
    return "triton" if on_gpu() else "xla"


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


def _dot(lhs_PI, rhs_GIO, counts_G, out_dtype, activation=None):
    """``out[a] = act(lhs[a] @ rhs[group(a)])``: rows grouped by ``counts_G``; fp32
    accumulation, ``activation`` applied to it in the kernel."""
    with _no_cache_miss_lines():
        return _tokamax().ragged_dot(lhs_PI, rhs_GIO, counts_G,
                                     precision=matmul_precision(lhs_PI.dtype),
                                     preferred_element_type=out_dtype, activation=activation,
                                     implementation=implementation())


# --- the experts on the sorted rows, and their gated sum per token --------------------------

def _rows(a_P, pos_Nj, counts_E, past_groups: bool):
    """Each assignment's row of a kernel's output. ``past_groups``: some sort past every group
    (an expert mesh's empty slots); the kernels never write those rows (garbage), so they
    read 0 (the one-device path, where every row is in a group, needs no mask)."""
    if not past_groups:
        return a_P[pos_Nj]
    # the index, not the rows, is masked: out of range reads the fill (XLA keeps the gather one
    # fusion with its consumers; a select on the gathered rows split it, +0.4 ms a step)
    past_Nj = jnp.where(pos_Nj < jnp.sum(counts_E), pos_Nj, a_P.shape[0])
    return jnp.take(a_P, past_Nj, axis=0, mode="fill", fill_value=0)


def uses_kernels() -> bool:
    """Our gather kernels where tokamax runs its Triton kernels (a GPU); XLA elsewhere."""
    return implementation() == "triton"


def fused(dt) -> bool:
    """Our kernels that put two GEMMs on the same rows in one (``mlp_gemm``, ``dout_gemm``,
    ``dv_gemm``; each also checks its sizes) for 2-byte rows: fp32 blocks overflow sm_89's
    99 KiB of shared memory (deviceless compiles asked 108-144 KiB), so fp32 runs keep the
    separate kernels."""
    return uses_kernels() and jnp.dtype(dt).itemsize == 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def expert_sum(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, w1_EHC, b1_EH,
               w2_ECH, b2_EC):
    """``out[n] = sum_j gates[n, j] (relu(x[n] W1_e^T + b1_e)^2 W2_e^T + b2_e)``, e =
    ``expert[n, j]``, in fp32 (the original weights the experts' outputs in fp32), on the
    padded sorted rows (``src_P``: each row's assignment, token-major, -1 on pads;
    ``pos_Nj``: each assignment's row; ``counts_E``: rows per expert). Weights are the
    layer's own parameters, cast here: the backward keeps them (a layer scan does not stack
    them), not a bf16 copy."""
    return _forward(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, w1_EHC,
                    b1_EH, w2_ECH, b2_EC)[0]


def _forward(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, w1_EHC, b1_EH,
             w2_ECH, b2_EC):
    """h = relu(x[token] W1^T + b1)^2 with the rows gathered, the bias added and the
    activation applied in the kernel (on its fp32 accumulator): no pass of their own. On a GPU
    both GEMMs in one kernel where h's width fits (``mlp_gemm.py``): h is not read back."""
    dt = x_NC.dtype
    tok_P = jnp.maximum(src_P, 0) // pos_Nj.shape[1]
    if fused(dt) and mlp_fits(x_NC.shape[1], w1_EHC.shape[1]):
        h_PH, y_PC = expert_mlp(x_NC, tok_P, w1_EHC, b1_EH, w2_ECH, counts_E, use_kernel=True)
    else:
        h_PH = gather_dot(x_NC, tok_P, w1_EHC, counts_E, dt, b1_EH, relu2, w_nk=True,
                          use_kernel=uses_kernels())
        y_PC = _dot(h_PH, w2_ECH.astype(dt).mT, counts_E, dt)
    # the output bias where the rows are read anyway (b2 is a small, cached table)
    y_NjC = _rows(y_PC, pos_Nj, counts_E, past_groups).astype(f32) + b2_EC[expert_Nj].astype(f32)
    return jnp.einsum("nj,njc->nc", gates_Nj, y_NjC), h_PH


def _fwd(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, *w):
    out, h_PH = _forward(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, *w)
    # h only: not relu's input (relu(v) = sqrt(h), so relu^2' = 2 sqrt(h)), nor the experts'
    # outputs (the gates' gradient is <dout W2, h> + <dout, b2>, see _bwd)
    return out, (x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, h_PH, *w)


def _bwd(past_groups, res, dout_NC):
    x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, h_PH, *w = res
    w1_EHC, b1_EH, w2_ECH, b2_EC = w
    dt, j = x_NC.dtype, pos_Nj.shape[1]
    kernels = uses_kernels()
    # the output gradient in the compute dtype, gathered per row inside the kernels
    # (the barrier: XLA would otherwise fuse the rounding into each reader, reading fp32)
    dout_lo = jax.lax.optimization_barrier(dout_NC.astype(dt))
    src = jnp.maximum(src_P, 0)
    tok_P = src // j
    gate_P = jnp.where(src_P >= 0, gates_Nj.reshape(-1)[src], 0.0)           # 0 on pads
    # one walk over the output gradient's gathered rows: dout W2 (ungated) stays in the
    # kernel's accumulator, its epilogue forms relu^2's gated gradient dv and the gates'
    # gradient <dout, y + b2> = <dout W2, h> + <dout, b2> (its first term here, where h is
    # read anyway); W2's gradient with the gates on h as it loads, b2's as the gated column
    # sums; all rounded to the compute dtype, as every other weight's gradient (the dense
    # layers' under autodiff, the original's under autocast); the sums stay fp32
    C, H, E = x_NC.shape[1], h_PH.shape[1], w1_EHC.shape[0]
    dv_PH, dg_P, dw2_ECH, db2_EC = relu2_grad_wgrad(
        dout_lo, tok_P, w2_ECH, counts_E, h_PH, gate_P, out_dtype=dt, use_kernel=kernels,
        separate=not (fused(dt) and dout_fits(C, H, E)))
    # the small matmuls with b2 read the output gradient in the compute dtype too, as every
    # other weight gradient here does (fp32 runs: fp32)
    hi = matmul_precision(dt)
    db2_NE = jnp.dot(dout_lo, b2_EC.astype(dt).T, precision=hi, preferred_element_type=f32)
    dgates_Nj = (_rows(dg_P, pos_Nj, counts_E, past_groups)
                 + jnp.take_along_axis(db2_NE, expert_Nj, axis=1))
    # dv W1 (W1 is (E, H, C) already) and W1's gradient, b1's as the column sums of dv; on
    # a GPU in one walk over dv where H fits (``dv_gemm.py``)
    if fused(dt) and dv_fits(C, H, E):
        drows_PC, dw1_EHC, db1_EH = dv_grads(dv_PH, x_NC, tok_P, w1_EHC, counts_E,
                                             out_dtype=dt, use_kernel=True)
    else:
        drows_PC = _dot(dv_PH, w1_EHC.astype(dt), counts_E, dt)
        dw1_EHC, db1_EH = gather_wgrad(dv_PH, x_NC, tok_P, counts_E, "b", colsum=True,
                                       use_kernel=kernels, out_dtype=dt)
    # a gather, no scatter-add
    dx_NC = _rows(drows_PC, pos_Nj, counts_E, past_groups).astype(f32).sum(1).astype(dt)
    return (dx_NC, dgates_Nj, None, None, None, None, dw1_EHC.astype(w1_EHC.dtype),
            db1_EH.astype(b1_EH.dtype), dw2_ECH.astype(w2_ECH.dtype), db2_EC.astype(b2_EC.dtype))


expert_sum.defvjp(_fwd, _bwd)


def experts(x_NC, gates_Nj, expert_Nj, s, params, past_groups: bool = False) -> jax.Array:
    """The experts' gated sum per token (fp32), nothing dropped, for the (N, j) assignments
    ``expert_Nj`` with gates ``gates_Nj``; ``s``: the assignments sorted by expert
    (``grouped.sort_assignments``); ``params``: the stacked (fc_weight, fc_bias,
    proj_weight, proj_bias) of the E experts; ``past_groups``: ``s.counts_R`` leaves some
    assignments in no group (skipped, read 0)."""
    N, j = expert_Nj.shape
    i32 = jnp.int32
    src_P = jnp.concatenate([s.order_A.astype(i32), jnp.full((PAD,), -1, i32)])
    counts_E = s.counts_R
    pos_Nj = s.rank_A.reshape(N, j)
    return expert_sum(past_groups, x_NC, gates_Nj, expert_Nj, src_P, pos_Nj, counts_E, *params)


def shared_experts_grouped(x_NC, gates_NS, params) -> jax.Array:
    """The S shared experts (each on every token, gated) through the same kernels, from their
    own (S, ...) weights: the backward keeps h alone, where the XLA MLP kept three (N, S H)
    arrays a layer (an expert mesh's shared experts; one GPU sorts them with the routed)."""
    N, S = gates_NS.shape
    if S == 0:
        return jnp.zeros(x_NC.shape, f32)
    expert_NS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (N, S))
    return experts(x_NC, gates_NS, expert_NS, every_token_assignments(N, S), params)
