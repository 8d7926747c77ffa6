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


def walk(folder: str, limit: int, error: type = NanoMoeError):
    """Every path under ``folder``, symlinked folders followed (each real folder once, so a
    link loop ends); more than ``limit`` entries is refused rather than walked for ever."""
    seen, todo, count = set(), [folder], 0
    while todo:
        top = todo.pop()
        real = os.path.realpath(top)
        if real in seen:
            continue
        seen.add(real)
        try:
            names = sorted(os.listdir(top))
        except FileNotFoundError:
            if top == folder:
                raise error(f"{top}: no such folder") from None
            continue  # removed while walking (a live run's finished temporary folder)
        except OSError as e:
            raise error(f"{top}: cannot list it ({e.strerror or e})") from None
        for name in names:
            count += 1
            if count > limit:
                raise error(f"{folder} holds more than {limit} files and folders, more than "
                            "expected here: point at the right folder")
            path = os.path.join(top, name)
            yield path
            if os.path.isdir(path):
                todo.append(path)


def refuse_special_files(folder: str, what: str, error: type = NanoMoeError,
                         limit: int = 100_000) -> None:
    """Refuse a FIFO, socket or device anywhere under ``folder`` (symlinked folders
    followed): reading one would block or never end."""
    for path in walk(folder, limit, error):
        if is_special(path):
            check_regular_file(path, what, error)
