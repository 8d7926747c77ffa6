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

import jax

def enable(directory: str | None) -> str | None:
    """Use ``directory`` (``~`` expanded) as the cache; ``off`` disables it. An environment's
    JAX_COMPILATION_CACHE_DIR wins. Returns the folder in use, or None when there is none (a
    folder that cannot be created only costs the speed-up)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not directory or directory == "off":
        return None
    path = os.path.expanduser(directory)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
