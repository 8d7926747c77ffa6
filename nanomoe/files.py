"""Checks on input paths before they are opened: a FIFO blocks the reader forever and a device
such as /dev/zero never ends, so every file the project reads must be a regular file."""

from __future__ import annotations

import os
import stat

from .errors import NanoMoeError


def check_regular_file(path, what: str = "file", error: type = NanoMoeError) -> None:
    """Raise ``error`` (one sentence) unless ``path`` is a regular file (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path} is a folder, not a {what}: give the path of the {what} itself")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
        raise error(f"{path} is {kind}, not a regular file: give a {what} stored on disk")


def is_special(path) -> bool:
    """True for an existing path that is neither a regular file nor a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
