"""Checks on train.py's flags taken together, run before anything is built or written:
paths given as empty strings, the sample prompt, learning rates the device cannot hold, and
--init_from combined with --resume or with an --overwrite that would delete it."""

from __future__ import annotations

import os

from . import run_dir
from .config_checks import float32_finite
from .errors import ConfigError
from .prompts import check_prompt

PATH_FLAGS = ("log_dir", "data", "tokenizer", "init_from", "hellaswag_file")
# A sample is for reading at the end of a run; each token is one decode step.
SAMPLE_TOKENS_MAX = 2**16


def check_flags(args) -> None:
    """One sentence for the first flag (or pair of flags) that cannot work."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            # "" is the current folder to os.path: --log_dir "" would write (and --overwrite
            # delete) there, --data "" would read every file in it
            raise ConfigError(f"--{name} is empty: give a path, or leave the flag out")
    check_prompt(args.sample_prompt, "--sample_prompt")
    if args.sample_tokens > SAMPLE_TOKENS_MAX:
        raise ConfigError(f"--sample_tokens must be at most {SAMPLE_TOKENS_MAX}, got "
                          f"{args.sample_tokens}: for longer text use python -m "
                          "nanomoe_jax.sample on the run's checkpoint")
    for name in ("max_lr", "min_lr"):
        rate = getattr(args, name) * max(1.0, args.embedding_lr_mult)
        if not float32_finite(rate):
            raise ConfigError(f"--{name} {getattr(args, name):g} (times --embedding_lr_mult "
                              f"{args.embedding_lr_mult:g}) is beyond float32, the type the "
                              "step computes in: use a learning rate below 1")
    if args.resume and args.init_from:
        raise ConfigError(f"--resume continues {args.log_dir} from its own newest checkpoint, "
                          f"so --init_from {args.init_from} would be ignored: drop --init_from "
                          "to resume, or drop --resume to start a new run from those weights")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_init_from_survives(args) -> None:
    """--overwrite deletes the old run's files before --init_from is read: refuse when the
    weights to start from are among them (the log folder itself means its checkpoints)."""
    if not (args.overwrite and args.init_from and not args.resume):
        return
    if not os.path.exists(args.init_from):
        return  # a hub name such as gpt2, or a path that the loader will report
    found = run_dir.artifacts(args.log_dir)
    doomed = [n for n in found if _inside(args.init_from, os.path.join(args.log_dir, n))]
    if found and os.path.realpath(args.init_from) == os.path.realpath(args.log_dir):
        doomed = found
    if doomed:
        raise ConfigError(f"--init_from {args.init_from} is part of the run in {args.log_dir} "
                          f"that --overwrite would delete ({', '.join(doomed)}) before training "
                          "starts: copy the weights out of it first, or choose another "
                          "--log_dir")
