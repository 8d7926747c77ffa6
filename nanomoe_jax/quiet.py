"""What orbax and tensorstore print after a failed checkpoint write (a full disk), kept off
stderr: the failure itself reaches save()/finish()/save_model(), which report it in one
sentence.

Importing this changes nothing. ``quiet_checkpoint_echoes()`` changes the whole process (log
filters, ``sys.unraisablehook``, ``sys.excepthook``) and is called by entry points only:
train.py, ``python -m conversion``, ``python -m nanomoe_jax.sample``; the echoes may come until
the interpreter exits, so it is never undone. The library scopes its own: ``writer_echoes_muted``
holds for one save or restore and restores everything after.
"""

from __future__ import annotations

import contextlib
import logging
import sys


def _closed_loop(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _OrbaxThreadErrors(logging.Filter):
    """Orbax logs a failed background write from each of its threads, with tracebacks; the
    same error is re-raised to the caller."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "orbax" not in record.pathname


class _UnretrievedWriteErrors(logging.Filter):
    """asyncio logs each of orbax's failed write futures ("Future exception was never
    retrieved") when it is collected, with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:  # asyncio passes the future in the message's context instead
            error = getattr(record, "exception", None)
        text = f"{record.getMessage()} {error!r}"
        return not (_closed_loop(error)
                    or "exception was never retrieved" in text and "Error writing" in text)


_ABSL_FILTER, _ASYNCIO_FILTER = _OrbaxThreadErrors(), _UnretrievedWriteErrors()


def _drop_closed_loop_echoes() -> None:
    """tensorstore's late callbacks, finding orbax's event loop closed, each report a
    RuntimeError through sys.unraisablehook or, from its C++ threads (PyErr_Print),
    sys.excepthook: drop those, pass on everything else."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook
    if getattr(excepthook, "nanomoe_closed_loop", False):
        return

    def quiet_unraisable(u):
        if not _closed_loop(u.exc_value):
            unraisable(u)

    def quiet_excepthook(kind, value, tb):
        if not _closed_loop(value):
            excepthook(kind, value, tb)

    quiet_excepthook.nanomoe_closed_loop = True
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook


def quiet_checkpoint_echoes() -> None:
    """For an entry point, once (a second call adds nothing): drop the echoes of a failed
    checkpoint write for the rest of the process."""
    logging.getLogger("absl").addFilter(_ABSL_FILTER)  # adding a filter twice is a no-op
    logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
    _drop_closed_loop_echoes()


@contextlib.contextmanager
def writer_echoes_muted():
    """While one save or restore runs: absl silent (orbax's writer threads log a failed write
    with a traceback of a hundred lines) and the closed-loop echoes dropped (they start while
    the manager closes, before the error reaches the caller); all restored afterwards."""
    absl = logging.getLogger("absl")
    level, hooks = absl.level, (sys.unraisablehook, sys.excepthook)
    absl.setLevel(logging.CRITICAL)
    _drop_closed_loop_echoes()
    try:
        yield
    finally:
        absl.setLevel(level)
        sys.unraisablehook, sys.excepthook = hooks
