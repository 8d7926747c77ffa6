"""The persistent compilation cache behind train.py's ``--compile_cache DIR``: a run whose
programs were compiled before (same model, shapes, options, jax version) loads them from disk.

On the CPU preset the first step fell from ~14-19 s to 3.6 s and a 20-step run from ~32-47 s to
22 s (benchmarks/NOTES.md, "Compile cache"). Programs that compile in under a second are not
written (jax's own threshold). Off by default: jax 0.10 writes an entry in place, so a full disk
or quota can leave a truncated one, which every later run warns about (and recompiles) until
the folder is deleted; a run's own files never depend on it.
"""

from __future__ import annotations

import os
import stat
import sys

import jax

from nanomoe.errors import ConfigError


def enable(directory: str | None) -> str | None:
    """Use ``directory`` (``~`` expanded) as the cache; ``off`` disables it. An environment's
    JAX_COMPILATION_CACHE_DIR wins. Returns the folder in use, or None when there is none.

    A path that exists and is not a folder (a file, a FIFO, a broken link) is a mistake in the
    flag: ConfigError, one sentence, before the run writes anything. A folder that cannot be
    created or written only costs the speed-up, and says so on stderr."""
    path = os.path.expanduser(directory or "off")
    if directory and directory != "off" and os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"--compile_cache {directory} is {_kind(path)}, not a folder: give a "
                          "folder for the compiled programs (created if missing), or off")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not directory or directory == "off":
        return None
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError as e:
        writable, why = False, e.strerror or str(e)
    else:
        why = "not writable"
    if not writable:
        print(f"warning: --compile_cache {directory}: cannot use it ({why}); running without "
              "the cache", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _kind(path: str) -> str:
    if not os.path.exists(path):
        return "a link to nothing (a broken symlink)"
    mode = os.stat(path).st_mode
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a regular file" if stat.S_ISREG(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
