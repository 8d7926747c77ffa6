"""Pieces shared by the Flax NNX models: options, norms, RoPE, attention, MLPs, the
layer stack (scan or unrolled, optional remat) and the tied head with its loss.

Mirrors ``nanomoe_torch/layers.py``. Mixed precision as torch autocast does it: parameters
fp32 (``param_dtype``); matmuls and attention in ``dtype`` (bf16 on accelerators); the residual
stream, norms, RoPE, softmax, the router and the loss in fp32. Axis letters of names like
``q_BTQD``: docs/dimensions.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import MOE_DISPATCH
from nanomoe.rope import rope_table

from . import norms
from .activations import gelu_tanh
from .attention import KVCache, attend, init_cache  # noqa: F401 - KVCache: models' import
from .loss import tied_cross_entropy

Dtype = Any
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs, recompute the cheap elementwise work
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_dtype() -> Dtype:
    """bf16 on accelerators, fp32 on CPU (where bf16 is emulated and slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Options:
    """How a model runs (not what it computes): precision, layer stacking, kernels."""

    dtype: Dtype = None  # None: default_dtype()
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True  # False: a Python loop over the same stacked parameters
    remat: str = "none"  # "none" | "full" | "dots"
    # None/"xla"/"cudnn": jax.nn.dot_product_attention; "custom_vjp": attention.py (CPU)
    attention_impl: str | None = None
    loss_chunk_tokens: int = 8192  # tokens per cross-entropy chunk (fp32 logits of one chunk)
    # a Mesh with an "expert" axis (expert parallelism, expert_parallel.py); None: no such axis
    expert_mesh: Any = None
    moe_dispatch: str | None = None  # None: the config's (same numbers, see moe.py)
    # tokamax's dispatch: the shared experts as one dense MLP (shared_gemm.py), not groups
    shared_dense: bool = False
    row_groups: int = 1  # the training loss on this many row groups (row_groups.py)
    # (block, x) -> x on each layer just before it runs: fsdp's gathers (sharding.Placement)
    place_layer: Any = None

    def __post_init__(self):
        if self.dtype is None:
            object.__setattr__(self, "dtype", default_dtype())
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.moe_dispatch not in (None, *MOE_DISPATCH):
            raise ValueError(f"moe_dispatch: must be None or one of {MOE_DISPATCH}, "
                             f"got {self.moe_dispatch!r}")
        if self.loss_chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens: must be positive, got {self.loss_chunk_tokens}")
        if self.row_groups < 1:
            raise ValueError(f"row_groups: must be at least 1, got {self.row_groups}")


def normal(std: float = 0.02):
    return nnx.initializers.normal(std)


# Every parameter names its dimensions where it is made (logical axes, docs/dimensions.md);
# sharding.py maps them onto the mesh. eager_sharding off: the mesh is chosen later.
def with_axes(init, axes: tuple[str, ...]):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def linear(n_in: int, n_out: int, opts: Options, rngs: nnx.Rngs, axes: tuple[str, str], *,
           bias: bool = True, std: float = 0.02, dtype: Dtype = None) -> nnx.Linear:
    """nn.Linear's twin: N(0, std) kernel stored (in, out) with logical ``axes``, zero bias."""
    return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=with_axes(normal(std), axes),
                      bias_init=with_axes(nnx.initializers.zeros_init(), axes[1:]),
                      dtype=dtype or opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)


# Norms compute and return fp32 (the next matmul casts to ``dtype``), as under autocast.
def rms_norm(dim: int, opts: Options, rngs: nnx.Rngs, axis: str = "embed") -> nnx.RMSNorm:
    return norms.RMSNorm(dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=opts.param_dtype,
                         scale_init=with_axes(nnx.initializers.ones_init(), (axis,)), rngs=rngs)


def layer_norm(dim: int, opts: Options, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return norms.LayerNorm(dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=opts.param_dtype,
                           scale_init=with_axes(nnx.initializers.ones_init(), ("embed",)),
                           bias_init=with_axes(nnx.initializers.zeros_init(), ("embed",)),
                           rngs=rngs)


def embed(n: int, dim: int, opts: Options, rngs: nnx.Rngs, rows: str = "vocab") -> nnx.Embed:
    """Lookups return fp32 rows (the residual stream); :func:`tied_logits` reads it in dtype.
    ``rows``: the logical axis of the table's rows (the vocabulary, or positions)."""
    return nnx.Embed(n, dim, embedding_init=with_axes(normal(0.02), (rows, "embed")),
                     dtype=jnp.float32, param_dtype=opts.param_dtype, rngs=rngs)


def tied_logits(wte: nnx.Embed, h: jax.Array, dtype: Dtype) -> jax.Array:
    """The tied output head: ``h @ wte^T`` in the compute dtype, (..., C) -> (..., V)."""
    return jnp.einsum("...c,vc->...v", h.astype(dtype), wte.embedding[...].astype(dtype))


def apply_rope(x_BTQD: jax.Array, base: float, positions_T: jax.Array | None = None,
               max_len: int | None = None) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position, in fp32 (GPT-J layout).

    Positions default to 0..T-1; a decode step passes its own (rows of the same table, so the
    cached keys and the full forward agree exactly)."""
    T, D = x_BTQD.shape[1], x_BTQD.shape[-1]
    if positions_T is None:
        table_TD = rope_table(T, D, base)
    else:
        table_TD = jnp.take(jnp.asarray(rope_table(max_len, D, base)), positions_T, axis=0)
    sin_T1d, cos_T1d = table_TD[:, None, 0::2], table_TD[:, None, 1::2]
    x = x_BTQD.astype(jnp.float32)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x0 * cos_T1d - x1 * sin_T1d, x1 * cos_T1d + x0 * sin_T1d], axis=-1)
    return out.reshape(x.shape).astype(x_BTQD.dtype)


class Attention(nnx.Module):
    """Causal attention shared by all three models.

    GPT: full heads, no RoPE. ModernGPT: RoPE, ``n_kv_head`` key/value heads (kept at that
    count: ``dot_product_attention`` maps query head j to kv head j // (n_head/n_kv_head)).
    MoeGPT: RoPE then RMSNorm over each head of q and k.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, opts: Options, rngs: nnx.Rngs,
                 *, bias: bool = True, rope_base: float | None = None, qk_norm: bool = False,
                 double_scale: bool = False, out_std: float = 0.02):
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.rope_base, self.attention_impl, self.dtype = rope_base, opts.attention_impl, opts.dtype
        self.c_qkv = linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, opts, rngs,
                            ("embed", "qkv"), bias=bias)
        self.out_proj = linear(n_embd, n_embd, opts, rngs, ("heads", "embed"), bias=bias,
                               std=out_std)
        self.q_norm = rms_norm(self.head_dim, opts, rngs, "head_dim") if qk_norm else None
        self.k_norm = rms_norm(self.head_dim, opts, rngs, "head_dim") if qk_norm else None
        # The original's quirk: 1/sqrt(hd) applied twice gives logits q.k / hd
        # (docs/original.md#moderngpt).
        self.scale = 1.0 / self.head_dim if double_scale else 1.0 / math.sqrt(self.head_dim)

    def __call__(self, x_BTC: jax.Array, cache: KVCache | None = None,
                 pos: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Causal self-attention over x; with a cache, x holds positions pos..pos+T-1, its keys
        and values are written into the cache and the queries read every cached position."""
        B, T, C = x_BTC.shape
        Q, J, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_qkv(x_BTC)
        q_BTQD = qkv[..., : Q * D].reshape(B, T, Q, D)
        k_BTJD = qkv[..., Q * D : (Q + J) * D].reshape(B, T, J, D)
        v_BTJD = qkv[..., (Q + J) * D :].reshape(B, T, J, D)
        positions_T = None if cache is None else pos + jnp.arange(T)
        if self.rope_base is not None:
            max_len = None if cache is None else cache.k_BZJD.shape[1]
            q_BTQD = apply_rope(q_BTQD, self.rope_base, positions_T, max_len)
            k_BTJD = apply_rope(k_BTJD, self.rope_base, positions_T, max_len)
        if self.q_norm is not None:
            q_BTQD, k_BTJD = self.q_norm(q_BTQD), self.k_norm(k_BTJD)
        q_BTQD, k_BTJD = q_BTQD.astype(self.dtype), k_BTJD.astype(self.dtype)
        v_BTJD = v_BTJD.astype(self.dtype)
        y_BTQD, cache = attend(q_BTQD, k_BTJD, v_BTJD, self.scale, self.attention_impl, cache, pos)
        return self.out_proj(y_BTQD.reshape(B, T, C)), cache


IN_MLP, OUT_MLP = ("embed", "mlp"), ("mlp", "embed")  # the MLPs' matrices


class GeluMLP(nnx.Module):
    """GPT-2: ``c_proj(gelu_tanh(c_fc(x)))``."""

    def __init__(self, n_embd: int, hidden: int, opts: Options, rngs: nnx.Rngs, out_std=0.02):
        self.c_fc = linear(n_embd, hidden, opts, rngs, IN_MLP)
        self.c_proj = linear(hidden, n_embd, opts, rngs, OUT_MLP, std=out_std)

    def __call__(self, x):
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class GluMLP(nnx.Module):
    """``c_proj(a * silu(b))`` with ``a, b = split(c_fc(x))`` (ModernGPT's default)."""

    def __init__(self, n_embd: int, hidden: int, opts: Options, rngs: nnx.Rngs, bias=True):
        self.c_fc = linear(n_embd, 2 * hidden, opts, rngs, IN_MLP, bias=bias)
        self.c_proj = linear(hidden, n_embd, opts, rngs, OUT_MLP, bias=bias)

    def __call__(self, x):
        a, b = jnp.split(self.c_fc(x), 2, axis=-1)
        return self.c_proj(a * jax.nn.silu(b))


class GatedMLP(nnx.Module):
    """Llama's SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, n_embd: int, hidden: int, opts: Options, rngs: nnx.Rngs, bias=True):
        self.gate_proj = linear(n_embd, hidden, opts, rngs, IN_MLP, bias=bias)
        self.up_proj = linear(n_embd, hidden, opts, rngs, IN_MLP, bias=bias)
        self.down_proj = linear(hidden, n_embd, opts, rngs, OUT_MLP, bias=bias)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def make_stack(make_block: Callable[[nnx.Rngs], nnx.Module], n_layer: int,
               rngs: nnx.Rngs) -> nnx.Module:
    """``n_layer`` blocks whose parameters are stacked on a leading layer axis."""

    @nnx.split_rngs(splits=n_layer)  # each parameter's axes gain a leading "layers"
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make_block(rngs)

    return build(rngs)


def run_stack(blocks: nnx.Module, x: jax.Array, opts: Options, cache: KVCache | None = None,
              pos: jax.Array | None = None) -> tuple[jax.Array, Any, KVCache | None]:
    """Apply stacked blocks in order. A block maps ``(x, cache, pos)`` to ``(x, aux, cache)``;
    aux and the updated caches come back stacked per layer.

    With ``scan_layers`` one ``lax.scan`` step is compiled for all layers; otherwise the same
    stacked parameters are sliced layer by layer in a Python loop (one device's default)."""
    graphdef, state = nnx.split(blocks)

    def step(x, layer):
        layer_state, layer_cache = layer
        block = nnx.merge(graphdef, layer_state)
        if opts.place_layer is not None:
            x = opts.place_layer(block, x)
        x, aux, layer_cache = block(x, layer_cache, pos)
        return x, (aux, layer_cache)

    policy = REMAT_POLICIES[opts.remat]
    if opts.place_layer is not None:  # fsdp: the gathered weights are gathered again
        policy = opts.place_layer.remat_policy(policy)
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=not opts.scan_layers)
    if opts.scan_layers:
        x, (aux, cache) = jax.lax.scan(step, x, (state, cache))
        return x, aux, cache
    n_layer = jax.tree.leaves(state)[0].shape[0]
    outs = []
    for i in range(n_layer):
        x, out = step(x, jax.tree.map(lambda a: a[i], (state, cache)))
        outs.append(out)
    aux, cache = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, aux, cache


def check_sequence_length(T: int, block_size: int) -> None:
    if T > block_size:
        raise ValueError(f"sequence length {T} is longer than block_size={block_size}; "
                         "use shorter sequences or a config with a larger block_size")


def head_and_loss(wte: nnx.Embed, h_BTC: jax.Array, targets_BT: jax.Array | None,
                  opts: Options, ignore_index: int) -> tuple[jax.Array, jax.Array | None]:
    """Tied-head logits (B, T, V) and, with targets, the chunked fp32 cross-entropy whose
    gradients come out of its forward pass (nanomoe_jax/loss.py). Under jit, XLA drops the
    full logits when a train step uses only the loss."""
    logits_BTV = tied_logits(wte, h_BTC, opts.dtype)
    if targets_BT is None:
        return logits_BTV, None
    B, T, C = h_BTC.shape
    loss = tied_cross_entropy(h_BTC.reshape(B * T, C), wte.embedding[...], targets_BT.reshape(-1),
                              ignore_index, opts.loss_chunk_tokens, opts.dtype)
    return logits_BTV, loss


class Decoding:
    """KV-cache decoding for the three models, built on their ``hidden(idx, cache, pos)``."""

    def init_cache(self, batch: int, length: int | None = None) -> KVCache:
        c = self.config
        return init_cache(c.n_layer, batch, length or c.block_size,
                          getattr(c, "n_kv_head", c.n_head), c.n_embd // c.n_head, self.opts.dtype)

    def decode(self, idx_BT: jax.Array, cache: KVCache, pos: jax.Array):
        """Logits of tokens at positions pos..pos+T-1 given the cache of earlier ones."""
        h_BTC, _, cache = self.hidden(idx_BT, cache, pos)
        return tied_logits(self.wte, h_BTC, self.opts.dtype), cache
