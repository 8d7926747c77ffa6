"""Sampling from a Flax model: top-k / temperature with a KV cache, the whole loop in one
jit-compiled call."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BV: jax.Array, key: jax.Array, top_k: int | None,
                  temperature: float) -> jax.Array:
    """One token per row: greedy at temperature 0, else top-k sampling (top_k None: all)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        vals_BK, idx_BK = jax.lax.top_k(logits_BV, top_k)
        choice_B = jax.random.categorical(key, vals_BK, axis=-1)
        return jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0]
    return jax.random.categorical(key, logits_BV, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "n_prompt", "top_k", "temperature"))
def _generate(graphdef, state, buf_BT, key, n_prompt, top_k, temperature):
    """Prefill the prompt into a KV cache, then decode one token per step: one compiled loop."""
    model = nnx.merge(graphdef, state)
    B, total = buf_BT.shape
    cache = model.init_cache(B, total)
    logits_BPV, cache = model.decode(buf_BT[:, :n_prompt], cache, jnp.int32(0))
    key, sub = jax.random.split(key)
    token_B = sample_logits(logits_BPV[:, -1], sub, top_k, temperature)

    def body(pos, carry):
        buf_BT, token_B, cache, key = carry
        buf_BT = buf_BT.at[:, pos].set(token_B.astype(buf_BT.dtype))
        logits_B1V, cache = model.decode(token_B[:, None].astype(buf_BT.dtype), cache, pos)
        key, sub = jax.random.split(key)
        return buf_BT, sample_logits(logits_B1V[:, 0], sub, top_k, temperature), cache, key

    buf_BT, token_B, _, _ = jax.lax.fori_loop(n_prompt, total - 1, body,
                                              (buf_BT, token_B, cache, key))
    return buf_BT.at[:, total - 1].set(token_B.astype(buf_BT.dtype))


def generate(model: nnx.Module, prompt: list[int], n_tokens: int, *, top_k: int | None = 50,
             temperature: float = 1.0, seed: int = 0, batch: int = 1) -> list[int]:
    """``n_tokens`` continuation tokens of ``prompt`` (fewer if block_size is reached)."""
    block_size = model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    prompt = prompt[-block_size:]
    total = min(block_size, len(prompt) + n_tokens)
    buf = jnp.zeros((batch, total), jnp.int32).at[:, : len(prompt)].set(jnp.asarray(prompt))
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, buf, jax.random.key(seed), len(prompt), top_k, temperature)
    return [int(t) for t in out[0, len(prompt):]]


def load_for_sampling(path: str):
    """A JAX checkpoint folder, or a .pt file holding our plain-dict config."""
    import os

    from nanomoe.config import config_from_dict
    from nanomoe.errors import ConversionError

    from . import create_model
    from .checkpoint import load_model

    if os.path.isdir(path):
        return load_model(path)
    from conversion import load_torch_weights
    from conversion.checkpoints import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    if (not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict)
            or "model_type" not in ckpt["config"] or not isinstance(ckpt.get("model"), dict)):
        raise ConversionError(f"{path}: its config is not ours; import it first with "
                              "python -m conversion from-torch")
    config = config_from_dict(ckpt["config"])
    return load_torch_weights(create_model(config, 0), ckpt["model"]), {}


if __name__ == "__main__":
    import sys

    from nanomoe.sampling_cli import main

    sys.exit(main("python -m nanomoe_jax.sample", load_for_sampling,
                  lambda m, ids, a, seed: generate(m, ids, a.max_new_tokens, top_k=a.top_k,
                                                   temperature=a.temperature, seed=seed)))
