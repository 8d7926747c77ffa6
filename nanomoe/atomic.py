"""Files that appear only when complete: write to a temporary name, then rename.

torch is imported by atomic_torch_save only: nanomoe itself imports no framework.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Callable

from .errors import CheckpointError


def write_advice(e: BaseException) -> str:
    """What to do about a failed write, from its errno (a full disk is not the only cause)."""
    code = getattr(e, "errno", None)
    if code in (errno.EISDIR, errno.ENOTDIR):  # not a disk that is full: a path in the way
        return ("a folder stands where a file should be (or a file where a folder should): "
                "move it away")
    if code == errno.ENOENT:
        return "a folder on the path does not exist (or was removed meanwhile): check the path"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some disk space (or choose another --log_dir) and --resume"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another --log_dir"
    return "check the free disk space and that the folder is writable, then --resume"


def describe(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0][:200] or type(e).__name__


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, then rename onto ``path``. A crash or a full disk never leaves a
    partial file under ``path`` nor a temporary one beside it, and whatever was there stays
    intact. torch.save reports a failed write as a RuntimeError, not an OSError."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = e if isinstance(e, OSError) else _os_error_in(e)
        raise CheckpointError(f"could not write {path} ({describe(cause)}); "
                              f"{write_advice(cause)}; the previous checkpoint is intact") from None


def _os_error_in(e: BaseException) -> BaseException:
    """The OSError behind a wrapped error (torch's writer keeps it as __context__), or e."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


# Messages of writers that wrap the OS error in their own text (tensorstore, torch's zip writer)
_MESSAGES = {"No space left": errno.ENOSPC, "Disk quota": errno.EDQUOT,
             "File too large": errno.EFBIG, "Read-only file system": errno.EROFS,
             "Permission denied": errno.EACCES}


def as_os_error(e: BaseException) -> BaseException:
    """The OSError behind ``e``, or one rebuilt from its text, or ``e`` itself."""
    found = _os_error_in(e)
    if isinstance(found, OSError):
        return found
    for text, code in _MESSAGES.items():
        if text in str(e):
            return OSError(code, os.strerror(code))
    return e


def check_free_space(folder: str, need_bytes: int, what: str) -> None:
    """Refuse a write that cannot fit before it starts: a checkpoint that dies half-way on a
    full disk leaves debris and, with async writers, errors from background threads."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise CheckpointError(f"could not write {what}: it needs about {need_bytes / 2**20:.1f} "
                              f"MiB and {folder} has {free / 2**20:.1f} MiB free; free some disk "
                              "space (or choose another --log_dir) and --resume; the previous "
                              "checkpoint is intact")


def atomic_torch_save(payload, path: str) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))
