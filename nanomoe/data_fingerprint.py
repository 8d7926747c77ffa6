"""What run.json records about the data files, so that --resume notices data changed in place
(the same path, other tokens): each file's size, modification time and a hash of its first
and last 64 KiB. A changed size, hash or set of files is refused; a new modification time
alone (a copy, a touch) is only reported."""

from __future__ import annotations

import hashlib
import os

from .errors import DataError

EDGE = 64 * 2**10
DATA_SUFFIXES = (".npy", ".bin", ".txt")  # what data.py reads from a folder


def data_files(data: str | None) -> list[str]:
    """The files ``--data`` names (a file, or the files of a folder), as absolute paths."""
    if data is None or not os.path.exists(data):
        return []
    if not os.path.isdir(data):
        return [os.path.abspath(data)]
    names = sorted(n for n in os.listdir(data) if n.endswith(DATA_SUFFIXES)
                   and os.path.isfile(os.path.join(data, n)))
    return [os.path.abspath(os.path.join(data, n)) for n in names]


def fingerprint(path: str) -> dict:
    info = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # data.py has refused FIFOs and devices already
        digest.update(f.read(EDGE))
        if info.st_size > EDGE:
            f.seek(max(EDGE, info.st_size - EDGE))
            digest.update(f.read(EDGE))
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def fingerprints(data: str | None) -> dict | None:
    """{path: fingerprint} for run.json; None for the built-in corpus."""
    files = data_files(data)
    return {p: fingerprint(p) for p in files} if files else None


def compare(old, new: dict | None, log_dir: str) -> str | None:
    """Raise DataError when the data differs from the run's; a note when only modification
    times changed; None when the same (or when run.json predates the record)."""
    if not isinstance(old, dict) or new is None:
        return None
    if set(old) != set(new):
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        what = f"missing {gone[0]}" if gone else f"new {added[0]}"
        raise DataError(f"--resume: the data files differ from those {log_dir} was trained on "
                        f"({what}); resume with the run's data, or start a new run")
    touched = []
    for path, now in new.items():
        was = old[path]
        same = isinstance(was, dict) and all(was.get(k) == now[k]
                                             for k in ("size", "edges_sha256"))
        if not same:
            raise DataError(f"--resume: {path} changed since {log_dir} was started (its size "
                            "or its first/last 64 KiB differ), so the run would continue on "
                            "other data; restore the file, or start a new run")
        if was.get("mtime_ns") != now["mtime_ns"]:
            touched.append(path)
    if touched:
        return (f"note: {touched[0]} has a new modification time but the same size, start and "
                "end as when the run began; resuming on it")
    return None
