"""A background prefetcher: the next batches of a loader (loader.py) read on a thread while the
device trains, with the loader state of what was consumed, so a checkpoint resumes exactly."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from .loader import positive_int


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Worker:
    queue: queue.Queue
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _prefetch(loader, w: _Worker) -> None:
    def put(item) -> bool:  # wait for room, but give up when asked to stop
        while not w.stop.is_set():
            try:
                w.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        while not w.stop.is_set():
            x, y = loader.next_batch()
            if not put((x, y, loader.state_dict())):
                return
    except BaseException as e:  # handed to the consumer, who re-raises it
        put(_Failure(e))


class Prefetcher:
    """Reads the loader's next ``depth`` batches on a background thread.

    Yields exactly the loader's sequence. ``state_dict()`` is the loader state after the batches
    *consumed* so far (not what the thread read ahead), so a checkpoint taken after batch n
    resumes at batch n+1. An exception in the thread is raised by the next ``next_batch()``.
    ``close()`` stops the thread and rewinds the loader to the consumed position.
    """

    def __init__(self, loader, depth: int = 2):
        self.loader, self.depth = loader, positive_int("depth", depth)
        self._state = loader.state_dict()
        self._worker: _Worker | None = None
        self._start()

    def _start(self) -> None:
        w = _Worker(queue.Queue(maxsize=self.depth))
        # The thread holds the loader, not self, so a forgotten Prefetcher is still collected.
        w.thread = threading.Thread(target=_prefetch, args=(self.loader, w), daemon=True,
                                    name="nanomoe-prefetch")
        self._worker = w
        w.thread.start()

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self._worker is None:
            raise RuntimeError("the Prefetcher is closed")
        item = self._worker.queue.get()
        if isinstance(item, _Failure):
            self._stop()
            raise item.error
        x, y, self._state = item
        return x, y

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return dict(self._state)

    def _stop(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.stop.set()
            w.thread.join()
            self.loader.load_state_dict(self._state)  # forget what was read ahead

    def load_state_dict(self, state: dict) -> None:
        self._stop()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()
        self._start()

    def reset(self) -> None:
        self._stop()
        self.loader.reset()
        self._state = self.loader.state_dict()
        self._start()

    def close(self) -> None:
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        w = getattr(self, "_worker", None)
        if w is not None:
            w.stop.set()
