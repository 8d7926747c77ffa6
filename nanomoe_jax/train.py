"""The JAX side of training: one jit-compiled step (all micro-batches inside a ``lax.scan``)
and AdamW as the original configures it. The backend train_loop drives (orbax checkpoints,
export to the original's .pt) is ``nanomoe_jax.backend.JaxBackend``."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanomoe.config import MoeGPTConfig

from .row_groups import grouped_losses


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above max_norm."""

    def update(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_embedding(path) -> bool:
    return any(getattr(k, "key", k) == "wte" for k in path)


def make_optimizer(config, params, weight_decay=0.1, b1=0.9,
                   b2=0.95) -> optax.GradientTransformation:
    """Clip to 1.0, then AdamW (betas b1, b2: the original's 0.9, 0.95; eps 1e-8) with decay
    on ndim >= 2 only; MoeGPT's embedding is not decayed (the original's param groups). The lr
    is applied in the step."""
    def decay(path, p):
        if isinstance(config, MoeGPTConfig) and is_embedding(path):
            return False
        # layer-stacked tensors carry a leading layer axis: a stacked vector is still a vector
        stacked = any(getattr(k, "key", k) == "blocks" for k in path)
        return p.ndim - stacked >= 2

    mask = jax.tree_util.tree_map_with_path(decay, params)
    return optax.chain(clip_by_global_norm_like_torch(1.0),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
                       optax.add_decayed_weights(weight_decay, mask))


def slice_loss(graphdef, params, x_BT, y_BT):
    """Loss and metrics of one device's slice of the batch (the original's forward)."""
    losses = grouped_losses(nnx.merge(graphdef, params), x_BT, y_BT)
    metrics = {"loss": losses["loss"]}
    if "moe" in losses:
        metrics.update(ce_loss=losses["ce_loss"], moe_loss=losses["moe_loss"],
                       dropped_fraction=jnp.mean(losses["moe"]["dropped_fraction"]))
    return losses["loss"], metrics


def loss_and_metrics(graphdef, params, x, y):
    """``x``: (B, T), or (D, B, T) for D data-parallel slices (one per device). Each slice's
    loss is computed on its own, as on one DDP rank (token mean, MoE capacity and balance loss
    per slice), and the D losses are averaged, as DDP averages gradients."""
    if x.ndim == 2 or x.shape[0] == 1:
        return slice_loss(graphdef, params, x.reshape(x.shape[-2:]), y.reshape(y.shape[-2:]))
    losses_D, metrics = jax.vmap(partial(slice_loss, graphdef, params))(x, y)
    return jnp.mean(losses_D), jax.tree.map(jnp.mean, metrics)


def accumulate_gradients(graphdef, params, x_ABT, y_ABT):
    """Mean loss gradient over A micro-batches (the original's gradient accumulation), with a
    ``lax.scan`` so only one micro-batch's activations are alive at a time. The micro-batches
    may be (A, B, T) or (A, D, B, T) (D device slices each)."""
    grad_fn = jax.value_and_grad(partial(loss_and_metrics, graphdef), has_aux=True)

    def micro(grads, xy):
        (_, metrics), g = grad_fn(params, *xy)
        return jax.tree.map(jnp.add, grads, g), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(micro, zeros, (x_ABT, y_ABT))
    A = x_ABT.shape[0]
    return jax.tree.map(lambda g: g / A, grads), jax.tree.map(jnp.mean, metrics)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(graphdef, tx, lr_mult, state, x_ABT, y_ABT, lr, post_update=None):
    """One optimizer step: accumulate, clip, AdamW with the host-computed learning rate.

    A step whose loss, gradient norm or new parameters are not finite is not applied (the
    state comes back unchanged and ``skipped`` is 1), so NaN never enters the weights; the
    host decides whether to stop."""
    params, opt_state = state
    grads, metrics = accumulate_gradients(graphdef, params, x_ABT, y_ABT)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: -lr * m * u, updates, lr_mult)
    new_params = optax.apply_updates(params, updates)
    if post_update is not None:  # nGPT's --ngpt_normalize_weights projection
        new_params = post_update(new_params)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & all_finite(new_params)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    return (keep(new_params, params), keep(new_opt_state, opt_state)), metrics


def jit_train_step(graphdef, tx, state_sharding, batch_sharding, replicated, post_update=None):
    """The jitted step train.py runs (state donated); the GPU plan compiles this same one."""
    return jax.jit(partial(train_step, graphdef, tx, post_update=post_update), donate_argnums=(1,),
                   in_shardings=(replicated, state_sharding, batch_sharding, batch_sharding,
                                 replicated),
                   out_shardings=(state_sharding, replicated))


def __getattr__(name: str):
    # JaxBackend lives in backend.py, which imports this module: re-exported lazily so that
    # `from nanomoe_jax.train import JaxBackend` still works whichever module loads first
    if name in ("JaxBackend", "initialize_distributed"):
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
