"""A run's log folder: what makes it hold a run, who may use it, and what --resume may change.

Rules (README, "When things go wrong"):
- a folder holds a run when any artifact of one is there (run.json, checkpoints, metrics);
- one process trains in a folder at a time: an advisory lock on the folder itself, which the
  kernel drops when the process dies, so a crashed run never leaves it stuck;
- ``--overwrite`` takes every artifact of the old run away before the new one writes, so no
  later ``--resume`` can pick up a piece of it;
- ``--resume`` refuses flags that change what the run computes and names each one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile

from . import data_fingerprint, run_files
from .errors import NanoMoeError

RUN_FILE = "run.json"
# Everything a run writes into its folder (train_loop, both backends, metrics).
ARTIFACTS = re.compile(r"^(run\.json|metrics\.jsonl(\.tmp)?|loss\.png|checkpoints|"
                       r"model_\d+\.pt(\.tmp)?|model_final\.pt(\.tmp)?)$")
# Flags recorded in run.json that change the numbers a run computes; --resume must keep them.
# (How it runs: mesh, scan/remat/attention, intervals, logging, sampling, stay free.)
COMPUTE_FLAGS = ("max_lr", "min_lr", "warmup_steps", "max_steps", "total_batch_size", "B", "T",
                 "dtype", "data", "seed", "embedding_lr_mult", "beta1", "beta2", "weight_decay",
                 "data_order")
# Flags added after runs were first recorded: an older run.json without them ran with these.
LATER_FLAGS = {"beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "data_order": "sequential"}


class RunDirError(NanoMoeError, ValueError):
    """A log folder that cannot be used as asked (another run's, in use, unwritable)."""


def artifacts(log_dir: str) -> list[str]:
    if not os.path.isdir(log_dir):
        return []
    return sorted(n for n in os.listdir(log_dir) if ARTIFACTS.match(n))


def has_checkpoint(log_dir: str) -> bool:
    folder = os.path.join(log_dir, "checkpoints")
    jax_steps = os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))
    return jax_steps or any(re.fullmatch(r"model_\d{6}\.pt", n) for n in artifacts(log_dir))


def compute_flags(args) -> dict:
    """The flags of ``args`` that fix what a run computes, as run.json records them."""
    flags = {k: getattr(args, k) for k in COMPUTE_FLAGS}
    flags["data"] = os.path.abspath(args.data) if args.data else None
    if getattr(args, "ngpt_normalize_weights", False):  # recorded only when on (older runs)
        flags["ngpt_normalize_weights"] = True
    return flags


def _refuse_special_files(log_dir: str, resume: bool) -> None:
    """A FIFO, socket or device among a run's files would block or never end the reader
    (metrics.jsonl, run.json, a checkpoint's files): refuse before opening any of them,
    looking into symlinked folders too."""
    run_files.check_kinds(log_dir, [n for n in artifacts(log_dir) if not n.endswith(".tmp")],
                          shapes=resume)


def overwrite_advice(log_dir: str) -> str:
    """--overwrite, with what it would delete: advice never points at files unseen."""
    return f"--overwrite (which deletes {', '.join(artifacts(log_dir))})"


def _read_run_file(log_dir: str) -> dict | None:
    path = os.path.join(log_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        raise RunDirError(f"{path} is not readable JSON; move the folder away or pass "
                          f"{overwrite_advice(log_dir)} to start afresh") from None
    if not isinstance(previous, dict):
        raise RunDirError(f"{path} is not a run description; move the folder away or pass "
                          f"{overwrite_advice(log_dir)} to start afresh")
    run_files.check_run_json(path, previous)
    return previous


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check(args, run_info: dict) -> None:
    """May this command use ``args.log_dir`` as asked? Raises RunDirError naming why not."""
    log_dir = args.log_dir
    if os.path.islink(log_dir) and not os.path.exists(log_dir):
        raise RunDirError(f"--log_dir {log_dir} is a symbolic link to nothing; remove it or "
                          "choose another --log_dir")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise RunDirError(f"--log_dir {log_dir} is a file, not a folder; choose another "
                          "--log_dir")
    _refuse_special_files(log_dir, args.resume)
    found = artifacts(log_dir)
    if not args.resume:
        if found and not args.overwrite:
            what = ("a run that stopped before its first checkpoint"
                    if not has_checkpoint(log_dir) else "a run")
            raise RunDirError(f"{log_dir} already holds {what}; pass --resume to continue it, "
                              f"{overwrite_advice(log_dir)} to start afresh, or choose another "
                              "--log_dir")
        return
    previous = _read_run_file(log_dir)
    if previous is None:
        raise RunDirError(f"--resume: {log_dir} holds no run to resume; drop --resume to start "
                          "a new one")
    run_files.check_metrics(os.path.join(log_dir, "metrics.jsonl"))
    for key in ("model_type", "framework", "tokenizer"):
        if previous.get(key) != run_info[key]:
            raise RunDirError(f"--resume: {log_dir} holds a run with another {key} "
                              f"({previous.get(key)} vs {run_info[key]}); resume with the same "
                              "flags or choose another --log_dir")
    changed = _differences(previous.get("config", {}), run_info["config"])
    if changed:
        raise RunDirError(f"--resume: {log_dir} holds a run with another config "
                          f"({'; '.join(changed)}); resume with the same flags or choose "
                          "another --log_dir")
    if "flags" in previous:  # runs written before flags were recorded are not checked
        changed = _differences({**LATER_FLAGS, **previous["flags"]}, run_info["flags"])
        if changed:
            raise RunDirError(f"--resume: {log_dir} was started with other flags that change "
                              f"what it computes ({'; '.join('--' + c for c in changed)}); "
                              "resume with the run's flags or choose another --log_dir")
    note = data_fingerprint.compare(previous.get("data_files"), run_info.get("data_files"),
                                    log_dir)
    if note:
        print(note, flush=True)


def check_writable(log_dir: str) -> None:
    """Fail now, with one sentence, if the log folder (or the folder it would be made in)
    cannot be written: a probe file is made and removed, nothing else changes."""
    where = log_dir
    while not os.path.exists(where):
        parent = os.path.dirname(os.path.abspath(where))
        if parent == os.path.abspath(where):
            break
        where = parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunDirError(f"--log_dir {log_dir}: cannot write in {where} "
                          f"({e.strerror or e}); choose a writable --log_dir") from None


class Lock:
    """An exclusive advisory lock on the log folder (flock on the directory: no file is
    created, and the kernel releases it when the process exits, however it exits)."""

    def __init__(self, log_dir: str):
        self.log_dir, self.fd = log_dir, None

    def acquire(self) -> "Lock":
        os.makedirs(self.log_dir, exist_ok=True)
        fd = os.open(self.log_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(f"{self.log_dir} is in use by another training run; wait for "
                                  "it to finish, or choose another --log_dir") from None
            raise
        self.fd = fd
        return self

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def clear_previous_run(log_dir: str) -> list[str]:
    """--overwrite: move every artifact of the old run into a hidden folder, then delete it.
    A crash half-way leaves only that hidden folder, which no command reads. Files that are
    not a run's artifacts (a user's notes) are left alone."""
    names = artifacts(log_dir)
    if not names:
        return []
    trash = tempfile.mkdtemp(prefix=".replaced-run-", dir=log_dir)
    for name in names:
        os.rename(os.path.join(log_dir, name), os.path.join(trash, name))
    shutil.rmtree(trash, ignore_errors=True)
    return names
