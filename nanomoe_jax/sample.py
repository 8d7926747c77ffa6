"""Sampling from a Flax model: top-k / temperature with a KV cache, the whole loop in one
jit-compiled call."""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nanomoe.config import config_from_dict
from nanomoe.errors import ConversionError
from nanomoe.pt_files import load_checkpoint_file

from . import create_model
from .checkpoint import load_model
from .weights import load_torch_weights


def sample_logits(logits_BV: jax.Array, key: jax.Array, top_k: int | None,
                  temperature: float) -> jax.Array:
    """One token per row: greedy at temperature 0, else top-k sampling (top_k None: all)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:  # k: the top_k candidates
        vals_Bk, idx_Bk = jax.lax.top_k(logits_BV, top_k)
        choice_B = jax.random.categorical(key, vals_Bk, axis=-1)
        return jnp.take_along_axis(idx_Bk, choice_B[:, None], axis=-1)[:, 0]
    return jax.random.categorical(key, logits_BV, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "n_prompt", "top_k", "temperature"))
def _generate(graphdef, state, buf_BT, key, n_prompt, top_k, temperature):
    """Fill ``buf_BT`` (B, total) after its first ``n_prompt`` tokens, in one compiled call.

    Up to block_size: prefill the prompt into a KV cache, then one cached token per step.
    Past it the window slides as nanoGPT's generate does: each next token is predicted from
    exactly the last block_size tokens, re-prefilled from scratch. A cache cannot be rolled:
    learned positions shift with the window, and every cached key and value was computed with
    the dropped tokens in its context, so it differs from a forward on the cropped window."""
    model = nnx.merge(graphdef, state)
    B, total = buf_BT.shape
    block = model.config.block_size
    cache = model.init_cache(B, min(total, block))
    logits_BTV, cache = model.decode(buf_BT[:, :n_prompt], cache, jnp.int32(0))
    key, sub = jax.random.split(key)
    token_B = sample_logits(logits_BTV[:, -1], sub, top_k, temperature)

    def cached(pos, carry):  # token_B goes to pos; its logits give the one at pos + 1
        buf_BT, token_B, cache, key = carry
        buf_BT = buf_BT.at[:, pos].set(token_B.astype(buf_BT.dtype))
        logits_B1V, cache = model.decode(token_B[:, None].astype(buf_BT.dtype), cache, pos)
        key, sub = jax.random.split(key)
        return buf_BT, sample_logits(logits_B1V[:, 0], sub, top_k, temperature), cache, key

    # the cached phase ends at the last position the window holds (min(total, block) - 1); a
    # prompt that already fills the window leaves its first new token at n_prompt = block
    last = max(n_prompt, min(total, block) - 1)
    buf_BT, token_B, _, key = jax.lax.fori_loop(n_prompt, last, cached,
                                                (buf_BT, token_B, cache, key))
    buf_BT = buf_BT.at[:, last].set(token_B.astype(buf_BT.dtype))
    if last + 1 >= total:
        return buf_BT

    def sliding(pos, carry):  # the token at pos from the block_size tokens before it
        buf_BT, key = carry
        window_BT = jax.lax.dynamic_slice_in_dim(buf_BT, pos - block, block, axis=1)
        logits_BTV, _ = model.decode(window_BT, model.init_cache(B, block), jnp.int32(0))
        key, sub = jax.random.split(key)
        token_B = sample_logits(logits_BTV[:, -1], sub, top_k, temperature)
        return buf_BT.at[:, pos].set(token_B.astype(buf_BT.dtype)), key

    buf_BT, _ = jax.lax.fori_loop(last + 1, total, sliding, (buf_BT, key))
    return buf_BT


def generate(model: nnx.Module, prompt: list[int], n_tokens: int, *, top_k: int | None = 50,
             temperature: float = 1.0, seed: int = 0, batch: int = 1) -> list[int]:
    """``n_tokens`` continuation tokens of ``prompt``, any number: past block_size each token
    sees the last block_size tokens (a prompt longer than that is cropped the same way)."""
    block_size = model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if n_tokens <= 0:
        return []
    prompt = prompt[-block_size:]
    total = len(prompt) + n_tokens
    buf = jnp.zeros((batch, total), jnp.int32).at[:, : len(prompt)].set(jnp.asarray(prompt))
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, buf, jax.random.key(seed), len(prompt), top_k, temperature)
    return [int(t) for t in out[0, len(prompt):]]


def load_for_sampling(path: str):
    """A JAX checkpoint folder, or a .pt file holding our plain-dict config."""
    if os.path.isdir(path):
        return load_model(path)

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

    from .quiet import quiet_checkpoint_echoes

    quiet_checkpoint_echoes()  # a failed restore's echoes, for this command's whole process
    sys.exit(main("python -m nanomoe_jax.sample", load_for_sampling,
                  lambda m, ids, a, seed: generate(m, ids, a.max_new_tokens, top_k=a.top_k,
                                                   temperature=a.temperature, seed=seed)))
