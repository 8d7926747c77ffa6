"""Batches: the original's window order across shards and ranks, resuming, argument and token
checks, and the prefetching thread that hands out the same sequence."""

import numpy as np
import pytest

from nanomoe.data import open_dataset
from nanomoe.errors import DataError
from nanomoe.loader import DataLoader, check_token_range
from nanomoe.prefetch import Prefetcher

rng = np.random.default_rng(0)


def _tokens(n, hi=50257):
    return rng.integers(0, hi, size=n, dtype=np.uint16)


def _starts(shards, B, T, rank, nproc, steps):
    """(shard, start) of each step's x window, read off the token values (shard i = i*1000+k)."""
    loader = DataLoader(shards, B, T, rank, nproc)
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
        assert y.reshape(-1)[-1] == x.reshape(-1)[-1] + 1
        np.testing.assert_array_equal(np.diff(x.reshape(-1)), 1)  # one contiguous window
        out.append(divmod(int(x[0, 0]), 1000))
    return out


SHARDS = [np.arange(25, dtype=np.uint16), np.arange(1000, 1040, dtype=np.uint16)]


def test_batch_order_single_process_switches_shards_and_wraps():
    # B*T = 6: shard 0 (25 tokens) gives windows at 0, 6, 12, 18 (18 + 7 = 25 still fits),
    # shard 1 (40 tokens) at 0..30, then back to shard 0.
    expected = [(0, 0), (0, 6), (0, 12), (0, 18)] + [(1, s) for s in range(0, 31, 6)]
    assert _starts(SHARDS, 2, 3, 0, 1, 2 * len(expected)) == expected * 2


def test_batch_order_two_ranks():
    # Each rank starts at B*T*rank and strides B*T*2 = 12; it changes shard when its own next
    # window would not fit, so (as in the original) rank 1 changes shard one step early.
    rank0 = [(0, 0), (0, 12), (1, 0), (1, 12), (1, 24)]
    rank1 = [(0, 6), (1, 6), (1, 18)]
    got0 = _starts(SHARDS, 2, 3, 0, 2, 15)
    got1 = _starts(SHARDS, 2, 3, 1, 2, 15)
    assert got0 == rank0 * 3 and got1 == rank1 * 5
    for (s0, p0), (s1, p1) in zip(got0, got1):  # same step: never the same tokens
        assert s0 != s1 or abs(p0 - p1) >= 6


def _reference(shards, B, T, rank, nproc, steps):
    """The original's loader (docs/original.md, Training loop: its data.py#L25-L47), written
    out independently."""
    shard, pos, out = 0, B * T * rank, []
    for _ in range(steps):
        out.append(np.asarray(shards[shard][pos:pos + B * T + 1]))
        pos += B * T * nproc
        if pos + B * T * nproc + 1 > len(shards[shard]):
            shard, pos = (shard + 1) % len(shards), B * T * rank
    return out


@pytest.mark.parametrize("B,T,nproc", [(1, 1, 1), (2, 5, 1), (3, 4, 2), (1, 7, 3)])
def test_batch_order_matches_reference(B, T, nproc):
    shards = [_tokens(n) for n in (97, 64, 150)]
    for rank in range(nproc):
        loader = DataLoader(shards, B, T, rank, nproc)
        for buf in _reference(shards, B, T, rank, nproc, 60):
            x, y = loader.next_batch()
            np.testing.assert_array_equal(x, buf[:-1].reshape(B, T))
            np.testing.assert_array_equal(y, buf[1:].reshape(B, T))


def test_batches_are_int32_copies_not_views(tmp_path):
    np.save(tmp_path / "d_train_1.npy", np.arange(100, dtype=np.uint16))
    split = open_dataset(tmp_path, split="train")
    x, y = DataLoader(split, 2, 4).next_batch()
    assert not np.shares_memory(x, split[0]) and not np.shares_memory(x, y)
    x[:] = 0  # writable, and the memmap is untouched
    assert split[0][1] == 1 and y[0, 0] == 1


def test_state_dict_resumes_exactly():
    shards = [_tokens(97), _tokens(64)]
    loader = DataLoader(shards, 2, 5, 1, 2)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    assert set(state) == {"shard", "position"}
    expected = [loader.next_batch() for _ in range(10)]
    fresh = DataLoader(shards, 2, 5, 1, 2)
    fresh.load_state_dict(state)
    for x, y in expected:
        x2, y2 = fresh.next_batch()
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    fresh.reset()
    first = DataLoader(shards, 2, 5, 1, 2).next_batch()[0]
    np.testing.assert_array_equal(fresh.next_batch()[0], first)
    with pytest.raises(DataError, match="does not fit"):
        fresh.load_state_dict({"shard": 5, "position": 0})


def test_shard_shorter_than_one_batch(tmp_path):
    np.save(tmp_path / "x_train_000001.npy", _tokens(1000))
    np.save(tmp_path / "x_train_000002.npy", _tokens(20))
    split = open_dataset(tmp_path, split="train")
    with pytest.raises(DataError) as e:
        DataLoader(split, 4, 8, 0, 2)
    msg = str(e.value)
    assert "x_train_000002.npy" in msg and "20 tokens" in msg and "65" in msg and "--B/--T" in msg


@pytest.mark.parametrize("kwargs", [dict(B=0), dict(T=-1), dict(B=1.5), dict(process_rank=2),
                                    dict(process_rank=-1), dict(num_processes=0)])
def test_loader_validates_arguments(kwargs):
    args = dict(B=1, T=4, process_rank=0, num_processes=2) | kwargs
    with pytest.raises(DataError):
        DataLoader([_tokens(100)], **args)


def test_token_ids_out_of_range():
    check_token_range(np.array([0, 255]), 256)
    with pytest.raises(DataError, match="token id 50300 in shard.npy is >= vocab_size 256"):
        check_token_range(np.array([1, 50300]), 256, "shard.npy")
    with pytest.raises(DataError, match="negative"):
        check_token_range(np.array([-1, 3]), 256)
    loader = DataLoader([np.array([1, 2, 3, 300, 4, 5, 6, 7, 8], np.uint16)], 1, 2,
                        vocab_size=256)
    loader.next_batch()
    with pytest.raises(DataError, match="token id 300 in shard 0 at position 2"):
        loader.next_batch()


def test_prefetcher_yields_the_loader_sequence_and_consumed_state():
    shards = [_tokens(97), _tokens(64), _tokens(150)]
    expected = DataLoader(shards, 2, 5, 1, 2)
    states = []
    with Prefetcher(DataLoader(shards, 2, 5, 1, 2), depth=3) as pf:
        assert pf.state_dict() == {"shard": 0, "position": 10}
        for _ in range(25):
            x, y = pf.next_batch()
            ex, ey = expected.next_batch()
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
            assert pf.state_dict() == expected.state_dict()  # not the read-ahead position
            states.append(pf.state_dict())
        # resume from the state after batch 10: the next batch is batch 11
        resumed = DataLoader(shards, 2, 5, 1, 2)
        resumed.load_state_dict(states[9])
        ref = DataLoader(shards, 2, 5, 1, 2)
        for _ in range(10):
            ref.next_batch()
        np.testing.assert_array_equal(resumed.next_batch()[0], ref.next_batch()[0])
        pf.load_state_dict(states[9])
        np.testing.assert_array_equal(pf.next_batch()[0],
                                      _reference(shards, 2, 5, 1, 2, 11)[10][:-1].reshape(2, 5))
    # closing rewinds the loader to what was consumed
    assert pf.loader.state_dict() == pf.state_dict()
    with pytest.raises(RuntimeError, match="closed"):
        pf.next_batch()


def test_prefetcher_raises_the_threads_error():
    bad = np.arange(0, 40, dtype=np.uint16)
    bad[20] = 999
    pf = Prefetcher(DataLoader([bad], 2, 4, vocab_size=256))
    pf.next_batch()
    pf.next_batch()
    with pytest.raises(DataError, match="token id 999"):
        pf.next_batch()
    assert pf.state_dict() == {"shard": 0, "position": 16}
    pf.close()
