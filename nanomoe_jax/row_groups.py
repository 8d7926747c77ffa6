"""Row groups: one micro-batch's rows as G independent forward/backward graphs.

XLA's CPU runtime splits each op over its thread pool, but the ops of a small model (a few
hundred KB each) are too small to keep every core busy: at nanoGPT's CPU quick-start size the
JAX step kept ~1.0 of the 2 cores busy on average. With the rows split into G groups the
step holds G independent chains of ops, which the runtime runs side by side (measured:
1.12x faster at G=2 on 2 cores; benchmarks/NOTES.md, "Row groups").

The numbers do not change: every loss is a mean over tokens, recombined here weighted by each
group's counted tokens, and MoeGPT's balance loss is recomputed from the groups' summed
router statistics. A split that would change the numbers is not made: MoeGPT whose capacity
can drop a token (drops depend on the whole batch) or runs expert-parallel.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from nanomoe.config import MoeGPTConfig

from .moe import balance_loss


def exact_split(model, n_tokens: int, n_group: int) -> bool:
    """Whether the loss of ``n_tokens`` tokens computed in groups of ``n_group`` equals the
    loss of all of them at once (up to rounding)."""
    c, opts = model.config, model.opts
    if not isinstance(c, MoeGPTConfig):
        return True
    if opts.expert_mesh is not None:
        return False
    dispatch = opts.moe_dispatch or c.moe_dispatch
    # capacity: exact only when every routed expert has a slot for every token at both sizes
    return dispatch != "capacity" or (c.capacity(n_tokens) >= n_tokens
                                      and c.capacity(n_group) >= n_group)


def group_count(model, rows: int, T: int) -> int:
    """The option's group count, lowered to a divisor of ``rows``; 1 where not exact."""
    g = min(model.opts.row_groups, rows)
    while g > 1 and rows % g:
        g -= 1
    return g if g > 1 and exact_split(model, rows * T, rows // g * T) else 1


def grouped_losses(model, x_BT: jax.Array, y_BT: jax.Array) -> dict:
    """``model(x, y)[1]`` (the losses dict), computed on row groups when the option asks."""
    G = group_count(model, *x_BT.shape)
    if G == 1:
        return model(x_BT, y_BT)[1]
    ys = jnp.split(y_BT, G)
    parts = [model(x, y)[1] for x, y in zip(jnp.split(x_BT, G), ys)]
    counts = [jnp.sum(y != model.ignore_index) for y in ys]
    moe = "moe" in parts[0]
    ce_key = "ce_loss" if moe else "loss"
    # token-weighted mean; a group with no counted token adds nothing (its own mean is 0/0)
    ce = sum(jnp.where(n > 0, p[ce_key] * n, 0.0) for p, n in zip(parts, counts)) / sum(counts)
    if not moe:
        return {"loss": ce}
    c = model.config
    stats = {k: sum(p["moe"][k] for p in parts) for k in ("tokens_per_expert", "score_sum")}
    stats["dropped_fraction"] = sum(p["moe"]["dropped_fraction"] for p in parts) / G
    stats["balance_loss"] = jax.vmap(partial(balance_loss, n_tokens=x_BT.size, c=c))(
        stats["tokens_per_expert"], stats["score_sum"])
    moe_loss = jnp.sum(stats["balance_loss"])
    return {"loss": ce + c.moe_loss_weight * moe_loss, "ce_loss": ce, "moe_loss": moe_loss,
            "moe": stats}
