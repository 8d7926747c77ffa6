"""torch's CPU thread count (nanomoe_torch/threads.py): the idle cores, an explicit choice wins."""

from __future__ import annotations

import io
import os

import pytest

torch = pytest.importorskip("torch")

from nanomoe_torch import threads  # noqa: E402


@pytest.mark.parametrize("cores,load,local,want", [
    (2, 0.1, 1, 2),    # a quiet machine: every core
    (2, 1.2, 1, 1),    # one core busy elsewhere: one thread, not a barrier waiting for it
    (2, 3.0, 1, 1),    # overloaded: still one
    (16, 4.0, 1, 12),  # the idle cores
    (8, 0.0, 2, 4),    # torchrun: the local processes share the cores
    (2, 0.0, 4, 1),
])
def test_threads_are_the_idle_cores(cores, load, local, want):
    n, why = threads.pick({}, cores, load, local)
    assert n == want and f"{cores} usable cores" in why


def test_an_explicit_choice_wins():
    assert threads.pick({"NANOMOE_TORCH_THREADS": "3"}, 2, 9.0)[0] == 3
    assert threads.pick({"OMP_NUM_THREADS": "2"}, 2, 9.0)[0] is None  # torch reads it itself
    with pytest.raises(ValueError, match="whole number"):
        threads.pick({"NANOMOE_TORCH_THREADS": "many"}, 2, 0.0)


def test_a_busy_cpu_gets_fewer_threads_and_is_told(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("NANOMOE_TORCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.4, 0.0, 0.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    out = io.StringIO()
    assert threads.choose_cpu_threads(out) == 1 and set_to == [1]
    assert "torch: 1 CPU thread instead of 4 (4 usable cores, load average 3.4" in out.getvalue()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    out = io.StringIO()
    assert threads.choose_cpu_threads(out) == 4 and out.getvalue() == ""  # nothing lowered
    monkeypatch.undo()
    assert torch.get_num_threads() == before
