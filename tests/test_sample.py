"""KV-cache decoding: the same logits as the full forward, and sampling that uses them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import GPT_CONFIGS, MODERN_CONFIGS, MOE_CONFIGS, jax_twin, no_drop, random_torch_model

from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
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


def test_sampling_respects_top_k_and_is_seeded():
    config = GPT_CONFIGS["gpt"]
    model = jax_twin(random_torch_model(config, seed=15), dtype=jnp.float32)
    out = generate(model, [1, 2, 3], 40, top_k=1, temperature=1.0, seed=0)
    assert out == generate(model, [1, 2, 3], 40, temperature=0.0)  # top-1 is greedy
    a = generate(model, [1, 2, 3], 20, top_k=50, seed=1)
    assert a == generate(model, [1, 2, 3], 20, top_k=50, seed=1)
    assert a != generate(model, [1, 2, 3], 20, top_k=50, seed=2)
    assert all(0 <= t < config.vocab_size for t in a)
    assert generate(model, [1, 2, 3], 0) == []


# Past block_size: four model families, a window of 8 tokens so the slide starts early.
SMALL = dict(n_layer=2, n_embd=32, n_head=4, block_size=8, vocab_size=96)
SLIDING = {"gpt": GPTConfig(**SMALL), "moderngpt": ModernGPTConfig(**SMALL, n_kv_head=2),
           # no drops: the reference below pads its windows, which must not take capacity
           "moegpt": no_drop(MoeGPTConfig(**SMALL, n_experts=6, n_shared_experts=1,
                                          n_activated_experts=2)),
           "ngpt": nGPTConfig(**SMALL)}


def greedy_reference_jax(model, prompt, n):
    """nanoGPT's generate, step by step with the training forward: each token the argmax
    after the last block_size tokens (padded to block_size: causal, so the pad is unseen)."""
    L = model.config.block_size
    forward = nnx.jit(lambda m, idx: m(idx)[0])
    seq = list(prompt)
    for _ in range(n):
        window = seq[-L:]
        idx = np.zeros((1, L), np.int32)
        idx[0, :len(window)] = window
        seq.append(int(np.argmax(np.asarray(forward(model, jnp.asarray(idx)))[0, len(window) - 1])))
    return seq[len(prompt):]


def greedy_reference_torch(model, prompt, n):
    L = model.config.block_size
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq[-L:]]))[0]
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", list(SLIDING))
@pytest.mark.parametrize("prompt", [[3, 1, 4, 1, 5], list(range(10, 30))], ids=["short", "long"])
def test_generation_slides_past_block_size(name, prompt):
    config = SLIDING[name]
    tm = random_torch_model(config, seed=16)
    model = jax_twin(tm, dtype=jnp.float32)
    n = 3 * config.block_size + 5  # the window slides 2.5 times over
    ours = generate(model, prompt, n, temperature=0.0)
    theirs = torch_generate(tm, prompt, n, temperature=0.0)
    assert len(ours) == len(theirs) == n
    assert ours == greedy_reference_jax(model, prompt, n)
    assert theirs == greedy_reference_torch(tm, prompt, n)
    assert ours == theirs


def test_sampled_generation_past_block_size():
    config = SLIDING["moderngpt"]
    model = jax_twin(random_torch_model(config, seed=17), dtype=jnp.float32)
    out = generate(model, [1, 2], 50, top_k=10, temperature=1.0, seed=3)
    assert len(out) == 50 and all(0 <= t < config.vocab_size for t in out)
    assert out == generate(model, [1, 2], 50, top_k=10, temperature=1.0, seed=3)
    assert generate(model, [1, 2], 50, top_k=1, seed=3) == generate(model, [1, 2], 50,
                                                                      temperature=0.0)


def test_500_tokens_past_block_size_in_both_frameworks():
    """The issue's length: 500 greedy tokens from a block of 8 (62 slides), token for token
    (every model slides, above, over 29 tokens)."""
    config = SLIDING["gpt"]
    tm = random_torch_model(config, seed=18)
    model = jax_twin(tm, dtype=jnp.float32)
    ours = generate(model, [7, 7, 2], 500, temperature=0.0)
    assert ours == torch_generate(tm, [7, 7, 2], 500, temperature=0.0)
    assert len(ours) == 500
