"""Where the benchmark tools write when not told: a folder in the user's cache, not the
repository. Running a README command must not replace the committed reference results in
benchmarks/results (issue 25); committing one is the explicit `--out benchmarks/results`."""

from __future__ import annotations

import os
from pathlib import Path

REPO_RESULTS = "benchmarks/results"  # what to pass as --out to commit a reference result


def default_out() -> Path:
    """$NANOMOE_RESULTS, else $XDG_CACHE_HOME/nanomoe/results, else ~/.cache/nanomoe/results."""
    if os.environ.get("NANOMOE_RESULTS"):
        return Path(os.environ["NANOMOE_RESULTS"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nanomoe" / "results"


def where_note(out: str | Path, chosen: bool) -> str:
    """The line a tool prints after writing: where, and how to commit instead."""
    if chosen:
        return f"results in {out}"
    return (f"results in {out} (the default folder, outside the repository; "
            f"--out {REPO_RESULTS} writes the committed reference instead)")
