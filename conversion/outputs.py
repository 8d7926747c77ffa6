"""Outputs of the conversion verbs: checked before anything is read, written all or nothing.

``--out`` may never be, contain or lie inside an input (a ``--force`` there would delete the
input), and ``--force`` replaces only what looks like an earlier output of the same verb.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from typing import Iterable

from nanomoe.errors import ConversionError

# what an earlier output of each kind looks like, for --force
KINDS = {
    "pt": "a .pt file written by torch.save",
    "folder": "a folder holding config.json and model.safetensors",
    "jax": "a folder holding checkpoints/",
}
# the only entries an earlier output folder may hold: --force replaces nothing else
_FOLDER_FILES = re.compile(
    r"config\.json|model\.safetensors|model\.safetensors\.index\.json"
    r"|model-\d+-of-\d+\.safetensors|generation_config\.json"
    r"|configuration_\w+\.py|modeling_\w+\.py|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt")


def _is_torch_zip(out: str) -> bool:
    """A zip as torch.save writes it: every member under one top folder, which holds
    ``data.pkl`` and a ``version`` (or ``byteorder``) record; any other zip (.docx, ...) is not."""
    try:
        with open(out, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                names = z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        return False
    top = tops.pop()
    members = set(names)
    return f"{top}/data.pkl" in members and bool(
        {f"{top}/version", f"{top}/.data/version", f"{top}/byteorder"} & members)


def _unexpected(out: str, kind: str) -> str | None:
    """Why ``out`` is not an earlier output of ``kind`` (naming the first entry that does not
    belong), or None where it is one."""
    if kind == "pt":
        if os.path.islink(out) or not os.path.isfile(out) or not _is_torch_zip(out):
            return f"it is not {KINDS['pt']}"
        return None
    if os.path.islink(out) or not os.path.isdir(out):
        return "it is not a folder"
    try:
        entries = sorted(os.listdir(out))
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    if "run.json" in entries:
        return "it is a training run (it holds run.json)"
    for name in entries:
        path = os.path.join(out, name)
        if kind == "jax":
            ok = name == "checkpoints" and os.path.isdir(path) and not os.path.islink(path)
        else:
            ok = (_FOLDER_FILES.fullmatch(name) is not None and os.path.isfile(path)
                  and not os.path.islink(path))
        if not ok:
            return f"it holds {name}, which this verb does not write"
    if kind == "folder" and entries and "config.json" not in entries:
        return "it holds no config.json"
    return None


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
    if not os.path.exists(out):
        raise ConversionError(f"--out {out} is a link to nothing (a broken symlink): remove it "
                              "or choose another --out")
    if not force:
        raise ConversionError(f"{out} already exists: choose another --out or pass --force")
    why = _unexpected(out, kind) if kind else None
    if why:
        raise ConversionError(f"{out} exists but {why}, so it is not {KINDS[kind]} (an earlier "
                              "output of this verb) and --force does not replace it: remove it "
                              "yourself or choose another --out")


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
        try:
            yield staging
            _normal_permissions(staging)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - each writer has its own type for a full disk
            raise write_error(out, e) from e
        if os.path.lexists(out):  # --force: keep the old one until the new one is in place
            os.rename(out, os.path.join(tmp, "replaced"))
        os.rename(staging, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error(out: str, e: BaseException) -> ConversionError:
    """A writer's failure (safetensors' SafetensorError, torch's zip writer, orbax's
    ValueError, OSError: a full disk, a quota, a file-size limit) as one sentence."""
    detail = (str(e).splitlines() or [""])[0].strip()
    detail = detail if len(detail) <= 120 else detail[:117] + "..."
    try:
        free = f"{shutil.disk_usage(os.path.dirname(out)).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "its free space unknown"
    return ConversionError(f"could not write {out} ({type(e).__name__}: {detail}); nothing was "
                           f"written: check the disk space and quota where it goes ({free}) "
                           "and run again, or choose another --out")
