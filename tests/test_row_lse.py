"""The loss's one-read log-sum-exp (nanomoe_jax/row_lse.py): its Pallas Triton kernel in
interpret mode against jax.nn.logsumexp in float64, on rows longer than a block and not a
whole number of blocks, large and spread logits, bf16 and fp32, rows past a whole program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import row_lse as rl


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setattr(rl, "INTERPRET", True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_logsumexp_and_picks_the_target(interpreted, dtype):
    M, V = 37, 2 * rl.BV + 300  # 3 column steps, the last partial; 3 programs, the last partial
    k = jax.random.split(jax.random.key(0), 3)
    # spread and offset rows: a max of ~40 and rows far below the first block's max
    logits = (jax.random.normal(k[0], (M, V)) * 6.0 + jnp.linspace(-30, 30, M)[:, None]
              ).astype(dtype)
    targets = jax.random.randint(k[1], (M,), 0, V).at[0].set(V - 1).at[1].set(0)
    x64 = np.asarray(logits.astype(jnp.float32), np.float64)
    want_lse = np.log(np.sum(np.exp(x64 - x64.max(1, keepdims=True)), 1)) + x64.max(1)
    want_t = x64[np.arange(M), np.asarray(targets)]
    for use_kernel in (False, True):
        lse, t = rl.row_lse(logits, targets, use_kernel=use_kernel)
        assert lse.dtype == t.dtype == jnp.float32
        np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(t, want_t.astype(np.float32))


def test_loss_picks_the_kernel_on_a_gpu_only(monkeypatch):
    """The choice follows the default device; a CPU run keeps XLA's logsumexp."""
    assert not rl.on_gpu()
    calls = []
    monkeypatch.setattr(rl, "on_gpu", lambda: True)
    monkeypatch.setattr(rl, "INTERPRET", True)
    monkeypatch.setattr(rl.pl, "pallas_call",
                        lambda *a, _p=rl.pl.pallas_call, **k: (calls.append(k["name"]),
                                                                _p(*a, **k))[1])
    from nanomoe_jax.loss import tied_cross_entropy

    k = jax.random.split(jax.random.key(1), 3)
    h, w = jax.random.normal(k[0], (40, 16)), jax.random.normal(k[1], (1100, 16)) * 0.3
    t = jax.random.randint(k[2], (40,), 0, 1100)
    got = jax.value_and_grad(tied_cross_entropy, argnums=(0, 1))(h, w, t, -1, 16, jnp.float32)
    assert calls and set(calls) == {"row_lse"}
    monkeypatch.setattr(rl, "on_gpu", lambda: False)
    want = jax.value_and_grad(tied_cross_entropy, argnums=(0, 1))(h, w, t, -1, 16, jnp.float32)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
