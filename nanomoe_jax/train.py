"""The JAX side of training: one jit-compiled step (all micro-batches inside a ``lax.scan``)
and AdamW as the original configures it. The backend train_loop drives (orbax checkpoints,
export to the original's .pt) is ``nanomoe_train.jax_backend.JaxBackend``."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanomoe.config import MoeGPTConfig

from . import sharding as shd
from .expert_arrays import per_layer
from .replicas import Copies, per_device_mean
from .row_groups import grouped_losses


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above max_norm."""

    def update(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_embedding(axes: tuple[str, ...]) -> bool:
    """The token embedding (and the head tied to it): rows over the vocabulary."""
    return axes[:1] == ("vocab",)


def make_optimizer(config, params, weight_decay=0.1, b1=0.9,
                   b2=0.95) -> optax.GradientTransformation:
    """Clip to 1.0, then AdamW (betas b1, b2: the original's 0.9, 0.95; eps 1e-8) with decay
    on matrices only (two or more axes besides the layer stack's); MoeGPT's embedding is not
    decayed (the original's param groups). The lr is applied in the step."""
    def decay(axes):
        if isinstance(config, MoeGPTConfig) and is_embedding(axes):
            return False
        return len([a for a in axes if a != shd.LAYERS]) >= 2

    mask = shd.per_parameter(params, decay)
    return optax.chain(clip_by_global_norm_like_torch(1.0),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
                       optax.add_decayed_weights(weight_decay, mask))


def slice_loss(graphdef, params, x_BT, y_BT, place_layer=None):
    """Loss and metrics of one device's slice of the batch (the original's forward)."""
    if place_layer is not None:  # fsdp: gather the weights where they are used
        params = place_layer.outside_layers(params)
    model = nnx.merge(graphdef, params)
    if place_layer is not None:  # set here, not at construction: the step knows the mesh
        model.opts = dataclasses.replace(model.opts, place_layer=place_layer)
    losses = grouped_losses(model, x_BT, y_BT)
    metrics = {"loss": losses["loss"]}
    if "moe" in losses:
        metrics.update(ce_loss=losses["ce_loss"], moe_loss=losses["moe_loss"],
                       dropped_fraction=jnp.mean(losses["moe"]["dropped_fraction"]))
    return losses["loss"], metrics


def loss_and_metrics(graphdef, params, x, y, place_layer=None):
    """``x``: (B, T), or (Y, B, T) for Y data-parallel slices (one per device). Each slice's
    loss is computed on its own, as on one DDP rank (token mean, MoE capacity and balance loss
    per slice), and the Y losses are averaged, as DDP averages gradients."""
    one = partial(slice_loss, graphdef, place_layer=place_layer)
    if x.ndim == 2 or x.shape[0] == 1:
        return one(params, x.reshape(x.shape[-2:]), y.reshape(y.shape[-2:]))
    losses_Y, metrics = jax.vmap(one)(params, x, y)
    return jnp.mean(losses_Y), jax.tree.map(jnp.mean, metrics)


def accumulate_gradients(graphdef, params, x_WBT, y_WBT, grad_sharding=None, place_layer=None):
    """Mean loss gradient over W micro-batches (the original's gradient accumulation), with a
    ``lax.scan`` so only one micro-batch's activations are alive at a time. The micro-batches
    may be (W, B, T) or (W, Y, B, T) (Y device slices each).

    On a mesh (``grad_sharding``: the parameters' NamedShardings) the gradient is taken with
    respect to per-group and per-slice copies of the parameters (replicas.py), carried
    through the micro-batch loop where it was made and summed once after it, in fp32: one
    reduction per optimizer step whatever W, the tied embedding's two uses included. Left to
    XLA, every micro-batch's gradient was all-reduced, in bf16 for the layers, and the
    embedding's twice.

    On one device with the layers unrolled, the gradient is taken with respect to each
    layer's own expert arrays, split from the stacks and cast to the compute dtype once a
    step (expert_arrays.py: otherwise copied for the MoE's kernels every micro-batch)."""
    x_WYBT, y_WYBT = (x_WBT[:, None], y_WBT[:, None]) if x_WBT.ndim == 3 else (x_WBT, y_WBT)
    W, Y = x_WYBT.shape[:2]
    if grad_sharding is None:  # one device: the gradient of the parameters themselves
        loss, params_F, reduce = partial(loss_and_metrics, graphdef), params, (lambda g: g)
        if not nnx.merge(graphdef, params).opts.scan_layers:  # each layer's own arrays
            loss, params_F, reduce = per_layer(graphdef, params, loss_and_metrics)
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        x, y, pin, n = x_WYBT, y_WYBT, (lambda g: g), W
    else:
        copies = Copies(grad_sharding, Y)
        losses = copies.group_losses(partial(slice_loss, graphdef, place_layer=place_layer))
        grad_fn = jax.value_and_grad(losses, has_aux=True)
        params_F, pin, reduce, n = copies.make(params), copies.pin, copies.reduce, W * copies.F
        split = lambda v: v.reshape(W, copies.F, copies.g, *v.shape[2:])  # noqa: E731
        x, y = split(x_WYBT), split(y_WYBT)

    def micro(grads, xy):
        (_, metrics), g = grad_fn(params_F, *xy)
        return jax.tree.map(jnp.add, grads, pin(g)), metrics

    if W == 1:  # no loop: the gradient goes straight to its reduction
        (_, metrics), grads = grad_fn(params_F, x[0], y[0])
        grads, metrics = pin(grads), jax.tree.map(lambda m: m[None], metrics)
    else:
        grads, metrics = jax.lax.scan(micro, pin(jax.tree.map(jnp.zeros_like, params_F)), (x, y))
    return jax.tree.map(lambda g: g / n, reduce(grads)), jax.tree.map(jnp.mean, metrics)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(graphdef, tx, lr_mult, state, x_WBT, y_WBT, lr, post_update=None,
               grad_sharding=None, place_layer=None):
    """One optimizer step: accumulate, clip, AdamW with the host-computed learning rate.

    A step whose loss, gradient norm or learning rate is not finite is not applied (the state
    comes back unchanged and ``skipped`` is 1); the host decides whether to stop. This is
    decided before the update, so the choice fuses into AdamW's one pass over the state: with
    those finite, the clipped gradients (and so both moments and the update) are finite. A
    new state that is still not finite (an update that overflows fp32) is reported as
    ``nonfinite_weights`` (its check fuses into the same pass) and the host stops."""
    params, opt_state = state
    grads, metrics = accumulate_gradients(graphdef, params, x_WBT, y_WBT, grad_sharding,
                                          place_layer)
    metrics["grad_norm"] = optax.tree.norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(lr)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: -lr * m * u, updates, lr_mult)
    new_params = optax.apply_updates(params, updates)
    if post_update is not None:  # nGPT's --ngpt_normalize_weights projection
        new_params = post_update(new_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    metrics["nonfinite_weights"] = (~all_finite(new_params)).astype(jnp.float32)
    return (new_params, new_opt_state), metrics


def jit_train_step(graphdef, tx, state_sharding, batch_sharding, replicated, post_update=None):
    """The jitted step train.py runs (state donated); the GPU plan compiles this same one. On
    a mesh the gradients are reduced once a step and fsdp weights gathered layer by layer."""
    multi = batch_sharding.mesh.size > 1
    step = partial(train_step, graphdef, tx, post_update=post_update,
                   grad_sharding=state_sharding[0] if multi else None,
                   place_layer=shd.layer_placement(state_sharding[0]) if multi else None)
    return jax.jit(step, donate_argnums=(1,),
                   in_shardings=(replicated, state_sharding, batch_sharding, batch_sharding,
                                 replicated),
                   out_shardings=(state_sharding, replicated))


def mesh_loss_and_metrics(graphdef, param_sharding, params, x_YBT, y_YBT):
    """Evaluation on a mesh: as the step runs, each device on its own slice (fsdp weights
    gathered layer by layer)."""
    one = partial(slice_loss, graphdef, place_layer=shd.layer_placement(param_sharding))
    return per_device_mean(one, param_sharding, params, x_YBT, y_YBT)


def jit_eval(graphdef, param_sharding, eval_sharding, replicated):
    """The jitted evaluation: (params, x_YBT, y_YBT) -> (mean loss, mean metrics)."""
    if eval_sharding.mesh.size == 1:
        fn = partial(loss_and_metrics, graphdef)
    else:
        fn = partial(mesh_loss_and_metrics, graphdef, param_sharding)
    return jax.jit(fn, in_shardings=(param_sharding, eval_sharding, eval_sharding),
                   out_shardings=replicated)
