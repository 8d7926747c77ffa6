"""Batches from token shards: the original's sequential order, nanoGPT's random windows, the
whole val split (the background prefetcher is in prefetch.py).

A loader yields ``(x, y)`` int32 arrays of shape (B, T), y being x shifted by one token, and
has ``state_dict`` / ``load_state_dict`` / ``reset`` so a checkpoint resumes the exact order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError

DATA_ORDERS = ("sequential", "random")


def check_token_range(x: np.ndarray, vocab_size: int, source: str = "the data") -> None:
    """Raise DataError if an id in ``x`` is negative or >= ``vocab_size``."""
    if x.size == 0:
        return
    hi, lo = int(x.max()), int(x.min())
    if hi >= vocab_size:
        raise DataError(f"token id {hi} in {source} is >= vocab_size {vocab_size}: "
                        "use a tokenizer/model that match")
    if lo < 0:
        raise DataError(f"token id {lo} in {source} is negative: the data is corrupt")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Shards:
    """What every loader checks and holds: shards, their names, B, T, rank, vocabulary."""

    def __init__(self, shards: Sequence[np.ndarray], B: int, T: int, process_rank: int,
                 num_processes: int, vocab_size: int | None):
        self.B, self.T = positive_int("B", B), positive_int("T", T)
        self.num_processes = positive_int("num_processes", num_processes)
        if isinstance(process_rank, bool) or not isinstance(process_rank, (int, np.integer)) \
                or not 0 <= process_rank < num_processes:
            raise DataError(f"process_rank must be in [0, {num_processes}), got {process_rank!r}")
        self.process_rank = int(process_rank)
        self.shards = list(shards)
        self.names = list(getattr(shards, "names", [f"shard {i}" for i in range(len(shards))]))
        if not self.shards:
            raise DataError("no shards to read batches from")
        self.vocab_size = vocab_size

    def _need(self, need: int, what: str, fix: str) -> None:
        for name, tokens in zip(self.names, self.shards):
            if len(tokens) < need:
                raise DataError(f"{name} has {len(tokens)} tokens, fewer than {what} "
                                f"= {need}): {fix}")

    def _batch(self, buf: np.ndarray, source) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) from B rows of T tokens read as one run of B*T+1; ``source()`` names where
        the run starts, for the range check."""
        if self.vocab_size is not None:
            check_token_range(buf, self.vocab_size, source())
        # Copies as int32: nothing keeps the memmap alive, frameworks take int32 directly.
        return (buf[:-1].astype(np.int32).reshape(self.B, self.T),
                buf[1:].astype(np.int32).reshape(self.B, self.T))

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()


class DataLoader(_Shards):
    """The original's sequential batches: B*T+1 tokens a step, ranks interleaved.

    Rank r starts at B*T*r of shard 0 and advances B*T*num_processes a step; when the next step
    would run past the shard it moves to the next shard (wrapping) at B*T*r. As in the original,
    the check uses the rank's own position, so ranks may change shard one step apart; their
    windows never overlap. ``vocab_size`` (optional) checks every batch's ids.
    """

    def __init__(self, shards: Sequence[np.ndarray], B: int, T: int, process_rank: int = 0,
                 num_processes: int = 1, vocab_size: int | None = None):
        super().__init__(shards, B, T, process_rank, num_processes, vocab_size)
        self._need(B * T * num_processes + 1, "one step needs (B*T*num_processes+1 = "
                   f"{B}*{T}*{num_processes}+1", "use smaller --B/--T or more data")
        self.reset()

    def reset(self) -> None:
        self.load_state_dict({"shard": 0, "position": self.B * self.T * self.process_rank})

    def state_dict(self) -> dict:
        return {"shard": self.current_shard, "position": self.current_position}

    def load_state_dict(self, state: dict) -> None:
        if not {"shard", "position"} <= set(state):
            raise DataError(f"data loader state {state} is not one of --data_order sequential: "
                            "resume with the run's --data_order")
        shard, pos = state["shard"], state["position"]
        for name, value in (("shard", shard), ("position", pos)):  # "4" or 4.5 is damage
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataError(f"data loader state {name} must be a whole number, got "
                                f"{value!r}: the checkpoint is damaged; move it away to "
                                "resume from the one before")
        shard, pos = int(shard), int(pos)
        if not 0 <= shard < len(self.shards) or not 0 <= pos <= len(self.shards[shard]) - (
                self.B * self.T + 1):
            raise DataError(f"data loader state {state} does not fit these shards "
                            f"({len(self.shards)} shards): resume with the same data, B and T")
        self.current_shard, self.current_position = shard, pos
        self.tokens = self.shards[shard]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        B, T, pos, shard = self.B, self.T, self.current_position, self.current_shard
        x, y = self._batch(self.tokens[pos: pos + B * T + 1],
                           lambda: f"{self.names[shard]} at position {pos}")
        self.current_position += B * T * self.num_processes
        if self.current_position + (B * T * self.num_processes + 1) > len(self.tokens):
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.tokens = self.shards[self.current_shard]
            self.current_position = B * T * self.process_rank
        return x, y


class RandomWindowLoader(_Shards):
    """nanoGPT's get_batch: every row its own T+1 tokens at a uniformly random start.

    Micro-batch n draws the starts of all B*num_processes rows of the global batch from
    ``np.random.default_rng([seed, n])`` and rank r keeps rows [r*B, (r+1)*B): the data does
    not depend on how rows are split over processes and devices, and the state is the count n
    alone (no generator state to store). A start is uniform over every window of every shard
    (x = tokens[i:i+T], y = tokens[i+1:i+T+1], i in [0, len - T - 1]), so each row picks its
    shard in proportion to the shard's usable length, len - T.
    """

    def __init__(self, shards: Sequence[np.ndarray], B: int, T: int, process_rank: int = 0,
                 num_processes: int = 1, vocab_size: int | None = None, seed: int = 0):
        super().__init__(shards, B, T, process_rank, num_processes, vocab_size)
        self._need(T + 1, f"one window needs (T+1 = {T}+1", "use a smaller --T or more data")
        self.ends = np.cumsum([len(s) - T for s in self.shards])  # windows up to each shard
        self.firsts = np.r_[0, self.ends[:-1]]
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.draws = 0

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        draws = state.get("draws")
        if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 0:
            raise DataError(f"data loader state {state} is not one of --data_order random: "
                            "resume with the run's --data_order")
        self.draws = int(draws)

    def starts(self) -> list[tuple[int, int]]:
        """(shard, start) of this rank's rows in the next micro-batch."""
        rng = np.random.default_rng([self.seed, self.draws])
        picks = rng.integers(0, self.ends[-1], size=self.B * self.num_processes)
        mine = picks[self.process_rank * self.B:(self.process_rank + 1) * self.B]
        shard = np.searchsorted(self.ends, mine, side="right")
        return [(int(s), int(i)) for s, i in zip(shard, mine - self.firsts[shard])]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rows = []
        for s, i in self.starts():
            rows.append(self.shards[s][i:i + self.T + 1])
            if self.vocab_size is not None:
                check_token_range(rows[-1], self.vocab_size, f"{self.names[s]} at position {i}")
        self.draws += 1
        buf = np.stack(rows)  # int32 copies, as DataLoader's
        return buf[:, :-1].astype(np.int32), buf[:, 1:].astype(np.int32)


def make_loader(order: str, shards, B: int, T: int, process_rank: int = 0,
                num_processes: int = 1, vocab_size: int | None = None, seed: int = 0):
    """The train loader for --data_order ``order``."""
    if order == "random":
        return RandomWindowLoader(shards, B, T, process_rank, num_processes, vocab_size, seed)
    return DataLoader(shards, B, T, process_rank, num_processes, vocab_size)


class LazyBatches:
    """``n`` batches read from ``loader`` as they are iterated (``len`` known up front), so a
    large --eval_steps never holds more than one batch."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.loader.next_batch() for _ in range(self.n))


class AllWindows:
    """Every full step window of a sequential loader's split once (--eval_steps all): window j
    of a shard is its tokens [j*S, (j+1)*S + 1), S = B*T*num_processes, of which this rank reads
    its B rows; each shard's last partial window is dropped. Read lazily, like LazyBatches."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        stride = loader.B * loader.T * loader.num_processes
        self.counts = [(len(s) - 1) // stride for s in loader.shards]

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self):
        L = self.loader
        stride, offset = L.B * L.T * L.num_processes, L.B * L.T * L.process_rank
        for k, (tokens, count) in enumerate(zip(L.shards, self.counts)):
            for j in range(count):
                pos = j * stride + offset
                yield L._batch(tokens[pos:pos + L.B * L.T + 1],
                               lambda: f"{L.names[k]} at position {pos}")  # noqa: B023


def eval_batches(loader: DataLoader, eval_steps: int | str):
    """The val batches of one evaluation: the whole split, or the first ``eval_steps``."""
    if eval_steps == "all":
        return AllWindows(loader)
    loader.reset()
    return LazyBatches(loader, eval_steps)
