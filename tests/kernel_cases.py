"""Shared by the fused MoE kernels' tests (test_mlp_gemm, test_dout_gemm, test_dv_gemm): the
experts' row counts, interpret mode, and the comparison."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe_jax import dout_gemm
from nanomoe_jax import gather_gemm as gg

# uneven experts, expert 1 empty, expert 3 a single row, no count a multiple of a row block
COUNTS = jnp.array([45, 0, 70, 1, 33], jnp.int32)
P = int(COUNTS.sum())


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels in Pallas interpret mode, at a test's few experts (on a GPU a walk over
    each expert's rows takes at least MIN_PROGRAMS programs)."""
    monkeypatch.setattr(gg, "INTERPRET", True)
    monkeypatch.setattr(dout_gemm, "MIN_PROGRAMS", 1)


def groups() -> np.ndarray:
    """Each row's expert."""
    return np.searchsorted(np.cumsum(np.asarray(COUNTS)), np.arange(P), side="right")


def close(got, want, rtol: float) -> None:
    """Within ``rtol`` of float64 ``want``, relative and of its largest entry."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))
