"""Importing or using the library changes nothing process-wide: the log filters and exception
hooks that keep a failed checkpoint write to one sentence are installed by entry points only
(train.py, python -m conversion, python -m nanomoe_jax.sample; docs/layering.md)."""

import logging
import sys

import nanomoe_jax
from nanomoe.config import GPTConfig
from nanomoe_jax.checkpoint import load_model, save_model
from nanomoe_jax.quiet import quiet_checkpoint_echoes

TINY = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=64)


def process_state():
    absl, asyncio = logging.getLogger("absl"), logging.getLogger("asyncio")
    return (sys.unraisablehook, sys.excepthook, absl.level, list(absl.filters),
            list(asyncio.filters))


def test_saving_and_loading_leave_the_process_as_it_was(tmp_path):
    before = process_state()
    import conversion  # noqa: F401 - importing changes nothing either
    import nanomoe_train.jax_backend  # noqa: F401

    save_model(nanomoe_jax.create_model(TINY, 0), str(tmp_path / "run"), 3)
    model, meta = load_model(str(tmp_path / "run"))
    assert meta["step"] == 3 and model.config == TINY
    assert process_state() == before


def test_the_entry_points_quieting_is_process_wide_and_idempotent(monkeypatch):
    absl, asyncio = logging.getLogger("absl"), logging.getLogger("asyncio")
    for target, name in ((sys, "unraisablehook"), (sys, "excepthook")):
        monkeypatch.setattr(target, name, getattr(target, name))
    monkeypatch.setattr(absl, "filters", list(absl.filters))
    monkeypatch.setattr(asyncio, "filters", list(asyncio.filters))
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    quiet_checkpoint_echoes()
    after_one = process_state()
    quiet_checkpoint_echoes()
    assert process_state() == after_one  # a second call adds nothing
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # dropped
    other = ValueError("kept")
    sys.excepthook(ValueError, other, None)
    assert seen == [other]


def test_tracing_a_grouped_gemm_leaves_the_log_filters_as_they_were():
    """tokamax's "Autotuning cache miss" lines are dropped only while its GEMM is traced."""
    import jax.numpy as jnp

    from nanomoe_jax import ragged_gemm

    before = process_state()
    x = jnp.ones((4 + ragged_gemm.PAD, 8))
    out = ragged_gemm._dot(x, jnp.ones((2, 8, 16)), jnp.array([3, 1], jnp.int32), jnp.float32)
    assert out.shape == (4 + ragged_gemm.PAD, 16)
    assert process_state() == before
