"""KV-cache decoding: the same logits as the full forward, and sampling that uses them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import GPT_CONFIGS, MODERN_CONFIGS, MOE_CONFIGS, jax_twin, random_torch_model
from nanomoe_jax.sample import generate
from nanomoe_torch.sample import generate as torch_generate

CONFIGS = {"gpt": GPT_CONFIGS["gpt"], "gqa": MODERN_CONFIGS["gqa-gated"],
           "mqa-double": MODERN_CONFIGS["mha-nobias-double"], "moe": MOE_CONFIGS["s2-nobias"]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_with_cache_equals_full_forward(name):
    config = CONFIGS[name]
    model = jax_twin(random_torch_model(config, seed=13), dtype=jnp.float32)
    idx = jnp.asarray(np.random.default_rng(13).integers(0, config.vocab_size, (2, 12)))
    full = np.asarray(nnx.jit(lambda m, i: m(i)[0])(model, idx))

    @nnx.jit
    def decode_all(model, idx):
        cache = model.init_cache(2, 16)
        prefill, cache = model.decode(idx[:, :5], cache, jnp.int32(0))  # a prompt of 5
        steps = [prefill]
        for t in range(5, 12):  # then one token at a time
            logits, cache = model.decode(idx[:, t:t + 1], cache, jnp.int32(t))
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    np.testing.assert_allclose(np.asarray(decode_all(model, idx)), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_the_torch_reference(name):
    config = CONFIGS[name]
    tm = random_torch_model(config, seed=14)
    model = jax_twin(tm, dtype=jnp.float32)
    prompt = [3, 1, 4, 1, 5]
    ours = generate(model, prompt, 10, temperature=0.0)
    ref = torch_generate(tm, prompt, 10, temperature=0.0)
    assert ours == ref and len(ours) == 10


def test_sampling_respects_top_k_and_block_size():
    config = GPT_CONFIGS["gpt"]
    model = jax_twin(random_torch_model(config, seed=15), dtype=jnp.float32)
    out = generate(model, [1, 2, 3], 100, top_k=1, temperature=1.0, seed=0)
    assert len(out) == config.block_size - 3  # stops at block_size
    assert out == generate(model, [1, 2, 3], 100, temperature=0.0)  # top-1 is greedy
    a = generate(model, [1, 2, 3], 20, top_k=50, seed=1)
    assert a == generate(model, [1, 2, 3], 20, top_k=50, seed=1)
    assert all(0 <= t < config.vocab_size for t in a)
