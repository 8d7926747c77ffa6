"""Outputs of the conversion verbs: checked before anything is read, written all or nothing.

``--out`` may never be, contain or lie inside an input (a ``--force`` there would delete the
input), and ``--force`` replaces only what looks like an earlier output of the same verb.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Iterable

from nanomoe.errors import ConversionError

# what an earlier output of each kind looks like, for --force
KINDS = {
    "pt": "a .pt file written by torch.save",
    "folder": "a folder holding config.json and model.safetensors",
    "jax": "a folder holding checkpoints/",
}


def _looks_like(out: str, kind: str) -> bool:
    if kind == "pt":
        if not os.path.isfile(out) or os.path.islink(out):
            return False
        with open(out, "rb") as f:
            return f.read(4) == b"PK\x03\x04"  # torch.save's zip format
    if os.path.islink(out) or not os.path.isdir(out):
        return False
    if kind == "folder":
        return all(os.path.isfile(os.path.join(out, n))
                   for n in ("config.json", "model.safetensors"))
    return os.path.isdir(os.path.join(out, "checkpoints"))


def _within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def check_output(out: str, force: bool, inputs: Iterable[str] = (),
                 kind: str | None = None) -> None:
    """Refuse (one sentence, nothing touched) an ``out`` that overlaps an input, that exists
    without ``force``, or that ``force`` would replace although it is not a ``kind`` output."""
    real = os.path.realpath(out)
    for src in inputs:
        if not os.path.lexists(src):
            continue  # a hub name
        real_src = os.path.realpath(src)
        if _within(real, real_src) or _within(real_src, real):
            where = ("is" if real == real_src else "lies inside" if _within(real, real_src)
                     else "contains")
            raise ConversionError(f"--out {out} {where} the input {src}: choose an --out "
                                  "outside the input, which is never replaced")
    if not os.path.lexists(out):
        return
    if not force:
        raise ConversionError(f"{out} already exists: choose another --out or pass --force")
    if kind and not _looks_like(out, kind):
        raise ConversionError(f"{out} exists but is not {KINDS[kind]} (an earlier output of "
                              "this verb), so --force does not replace it: remove it yourself "
                              "or choose another --out")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(path: str) -> None:
    """Files 0666, folders 0777, less the umask: the temporary folder's 0700 and mkstemp's
    0600 must not reach the output."""
    mask = _umask()
    for root, dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                executable = os.stat(p).st_mode & stat.S_IXUSR
                os.chmod(p, (0o777 if executable else 0o666) & ~mask)
        os.chmod(root, 0o777 & ~mask)
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_output(out: str, force: bool = False):
    """Yields a staging path beside ``out``; moved to ``out`` only if the block succeeds, so a
    failure leaves neither a partial ``out`` nor a half-replaced old one."""
    out = os.path.abspath(out)
    check_output(out, force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        staging = os.path.join(tmp, os.path.basename(out))
        yield staging
        _normal_permissions(staging)
        if os.path.lexists(out):  # --force: keep the old one until the new one is in place
            os.rename(out, os.path.join(tmp, "replaced"))
        os.rename(staging, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
