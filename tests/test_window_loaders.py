"""The data loaders behind nanoGPT's recipe (issue 15): seeded random windows (--data_order
random) drawn inside the shards, weighted by usable length, resumable from a count and the
same global batch for any rank layout; and --eval_steps all, which scores every window of the
split exactly once."""

import numpy as np
import pytest

from nanomoe.errors import DataError
from nanomoe.loader import AllWindows, DataLoader, RandomWindowLoader
from nanomoe.prefetch import Prefetcher


# ------------------------------------------------------------------------- random windows

SHARDS = [np.arange(20, dtype=np.uint16), np.arange(1000, 1050, dtype=np.uint16)]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_random_windows_are_seeded_inside_the_shards_and_shifted():
    a = batches(RandomWindowLoader(SHARDS, 4, 5, seed=7), 6)
    b = batches(RandomWindowLoader(SHARDS, 4, 5, seed=7), 6)
    c = batches(RandomWindowLoader(SHARDS, 4, 5, seed=8), 6)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    starts = {0: set(), 1: set()}
    for x, y in batches(RandomWindowLoader(SHARDS, 4, 5, seed=0), 1500):
        assert x.dtype == np.int32 and x.shape == y.shape == (4, 5)
        np.testing.assert_array_equal(y, x + 1)  # one shard, consecutive tokens, shifted by one
        for row in x:
            shard = int(row[0] >= 1000)
            starts[shard].add(int(row[0]) - 1000 * shard)
    # every start in [0, len - T - 1] is drawn, and none outside
    assert starts == {0: set(range(15)), 1: set(range(45))}


def test_shards_are_picked_by_usable_length():
    rows = np.concatenate([x[:, 0] for x, _ in batches(RandomWindowLoader(SHARDS, 8, 5), 1000)])
    assert np.mean(rows < 1000) == pytest.approx(15 / 60, abs=0.03)


def test_random_order_resumes_exactly_from_a_count():
    shards = [np.random.default_rng(1).integers(0, 500, 300).astype(np.uint16)]
    loader = RandomWindowLoader(shards, 3, 8, seed=5)
    with Prefetcher(loader, depth=3) as pf:
        batches(pf, 7)
        state = pf.state_dict()  # what was consumed, not what the thread read ahead
        assert state == {"draws": 7}
        expected = batches(pf, 5)
    fresh = RandomWindowLoader(shards, 3, 8, seed=5)
    fresh.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, batches(fresh, 5)):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    with pytest.raises(DataError, match="--data_order"):
        fresh.load_state_dict({"shard": 0, "position": 0})  # a sequential run's state
    with pytest.raises(DataError, match="--data_order"):
        DataLoader(shards, 3, 8).load_state_dict({"draws": 2})


def test_the_global_batch_does_not_depend_on_the_rank_layout():
    """One process with 8 rows = 2 processes of 4 (JAX: 2 devices each) = 4 torch ranks of 2."""
    shards = [np.arange(500, dtype=np.uint16), np.arange(600, 900, dtype=np.uint16)]
    for n in range(3):
        one = batches(RandomWindowLoader(shards, 8, 6, seed=3), n + 1)[-1]
        for rows, world in ((4, 2), (2, 4)):
            parts = [batches(RandomWindowLoader(shards, rows, 6, r, world, seed=3), n + 1)[-1]
                     for r in range(world)]
            np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), one[0])
            np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), one[1])


def test_random_windows_check_the_vocabulary_and_shard_length():
    bad = np.zeros(40, np.uint16)
    bad[-1] = 999
    loader = RandomWindowLoader([bad], 8, 4, vocab_size=256)
    with pytest.raises(DataError, match="token id 999 in shard 0 at position"):
        batches(loader, 50)
    with pytest.raises(DataError, match=r"fewer than one window needs \(T\+1 = 16\+1 = 17\)"):
        RandomWindowLoader([np.arange(16, dtype=np.uint16)], 2, 16)


# ---------------------------------------------------------------------------- eval all


def test_eval_all_scores_every_window_of_the_split_once():
    val = [np.arange(103, dtype=np.uint16), np.arange(200, 250, dtype=np.uint16)]
    B, T = 2, 8  # 16 tokens a window: 6 of shard 0 (97..102 left over), 3 of shard 1
    windows = AllWindows(DataLoader(val, B, T))
    assert len(windows) == 6 + 3
    xs = [x for x, _ in windows]
    np.testing.assert_array_equal(np.concatenate([x.ravel() for x in xs]),
                                  np.r_[np.arange(96), np.arange(200, 248)])
    for x, y in windows:
        np.testing.assert_array_equal(y, x + 1)
    # two ranks: each window's rows split between them, the same windows in all
    ranks = [list(AllWindows(DataLoader(val, 1, T, r, 2))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(windows)
    for (x0, _), (x1, _), x in zip(*ranks, xs):
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
