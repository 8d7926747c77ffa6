"""The globals a pickle names, found without unpickling it: its opcodes are decoded one at a
time (nothing is built, no code runs), from a stream that refuses to hand out more than a limit
of bytes. ``pt_files.py`` uses the list to admit the original's config classes by name and to
refuse anything else in one sentence before ``torch.load`` sees the file."""

from __future__ import annotations

import collections
import pickletools
import zipfile
import zlib

LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, storage keys; then raw bytes
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
               "BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class PickleTooLarge(Exception):
    """A pickle (or a length field inside it) past the reader's limit."""


class BoundedReader:
    """A read-only stream that refuses to hand out more than ``limit`` bytes in all (a length
    field of 2**60 in a pickle, a zip member inflating to GiBs) before reading them."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > self.left:
            raise PickleTooLarge
        data = self.f.read(self.left + 1 if n is None or n < 0 else n)
        if len(data) > self.left:
            raise PickleTooLarge
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.f.readline(self.left + 1)
        if len(line) > self.left:
            raise PickleTooLarge
        self.left -= len(line)
        return line


def _globals_in(stream) -> list[str]:
    """The dotted names the pickle at ``stream`` refers to (GLOBAL, INST, STACK_GLOBAL); the
    opcodes are only decoded, one at a time, and only the last two pushed strings and the
    memoised strings are kept. A STACK_GLOBAL whose strings cannot be traced is listed as
    ``'?.?'``, which no allow-list holds."""
    found: dict[str, None] = {}
    recent: collections.deque = collections.deque([None, None], maxlen=2)
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found[str(arg).replace(" ", ".")] = None
        elif name == "STACK_GLOBAL":
            a, b = recent
            found[f"{a or '?'}.{b or '?'}"] = None
        if name == "MEMOIZE" or name in _PUT_OPS:
            key = len(memo) if name == "MEMOIZE" else arg
            if recent[-1] is not None:
                memo[key] = recent[-1]
            else:
                memo.pop(key, None)
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name not in ("FRAME", "PROTO"):
            recent.append(None)
    return list(found)


def pickle_globals(path: str, limit: int) -> list[str]:
    """Every global named by the pickles in ``path``: the ``*.pkl`` members of a zip checkpoint,
    or the leading pickles of a legacy file (or of a raw pickle). Best effort: it serves the
    messages; ``torch.load(weights_only=True)`` is what enforces safety. A pickle larger than
    ``limit`` bytes raises :class:`PickleTooLarge` before anything would read it whole."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # how torch itself tells the formats apart
        f.seek(0)
        return _zip_globals(f, limit) if zipped else _legacy_globals(f, limit)


def _zip_globals(f, limit: int) -> list[str]:
    found: list[str] = []
    try:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.filename.endswith(".pkl"):
                    if info.file_size > limit:
                        raise PickleTooLarge
                    with z.open(info) as member:
                        found += _globals_in(BoundedReader(member, limit))
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError,
            NotImplementedError, RuntimeError, zlib.error):
        pass  # torch.load reports the damage
    return found


def _legacy_globals(f, limit: int) -> list[str]:
    found: list[str] = []
    bounded = BoundedReader(f, limit)
    for _ in range(LEGACY_PICKLES):
        try:
            found += _globals_in(bounded)
        except (ValueError, EOFError, KeyError, IndexError, UnicodeDecodeError,
                OverflowError, MemoryError):
            break  # past the pickles: raw storage bytes, or damage torch.load reports
    return found
