"""What --resume reads from a run folder, checked like a flag before it is used: run.json,
metrics.jsonl lines, a checkpoint's metadata, and the kind of every file (a FIFO blocks its
reader, a folder where metrics.jsonl should be is not a disk that is full). Each error is one
sentence naming the file and the field; nothing is written or repaired here."""

from __future__ import annotations

import json
import os
import stat

from .errors import NanoMoeError


class RunFileError(NanoMoeError, ValueError):
    """A file of a run folder whose content or kind is not what the run wrote."""


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def special_files(path: str):
    """Every FIFO, socket or device at or under ``path``, symlinked folders followed (each
    real folder once, so a link to an ancestor cannot loop)."""
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        try:
            info = os.stat(p)
        except OSError:  # a broken link or a vanished file: the readers report it
            continue
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            try:
                todo += [os.path.join(p, n) for n in os.listdir(p)]
            except OSError:
                continue
        elif not stat.S_ISREG(info.st_mode):
            yield p


def check_kinds(log_dir: str, names: list[str], shapes: bool) -> None:
    """Nothing special in a run's files; with ``shapes`` (files about to be read), files of
    a run are files and its checkpoints folder a folder."""
    for name in names:
        path = os.path.join(log_dir, name)
        for bad in special_files(path):
            raise RunFileError(f"{bad} is not a regular file (a FIFO, socket or device); move "
                               "it away, then run the command again")
        folder = os.path.isdir(path)
        if not shapes:
            continue
        if folder != (name == "checkpoints"):
            want = "a folder" if name == "checkpoints" else "a file"
            raise RunFileError(f"{path} should be {want} of the run but is not; move it away "
                               "(or restore the run's own), then run the command again")


def check_run_json(path: str, previous: dict) -> None:
    """run.json as train.py writes it: names are strings, config and flags are objects."""
    for key in ("model_type", "framework", "tokenizer"):
        if key in previous and not isinstance(previous[key], str):
            raise RunFileError(f"{path}: {key} must be a string, got {_shown(previous[key])}; "
                               "the file is damaged: restore it or start a new run elsewhere")
    for key in ("config", "flags", "data_files"):
        empty = key == "data_files" and previous[key] is None if key in previous else False
        if key in previous and not empty and not isinstance(previous[key], dict):
            raise RunFileError(f"{path}: {key} must be a JSON object, got "
                               f"{_shown(previous[key])}; the file is damaged: restore it or "
                               "start a new run elsewhere")


def check_metrics(path: str) -> None:
    """Every complete line of metrics.jsonl has a whole step >= 0 and numbers for values
    (a torn last line, from a killed run, is dropped by the logger and passes here)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            bad = None if whole(step) and step >= 0 else "step"
            bad = bad or next((k for k, v in record.items() if not number(v)), None)
            if bad:
                want = "a whole number >= 0" if bad == "step" else "a number"
                raise RunFileError(f"{path} line {lineno}: {bad} must be {want}, got "
                                   f"{_shown(record.get(bad))}; fix or delete that line, then "
                                   "--resume again")


def check_meta(meta, where: str, step: int, max_steps: int) -> dict:
    """A checkpoint's metadata: a mapping whose step is the checkpoint's own number, within
    the run, and whose data position is a mapping (the loader checks its fields)."""
    if not isinstance(meta, dict):
        raise RunFileError(f"{where}: its metadata is {_shown(meta)}, not a mapping; move "
                           "this checkpoint away to resume from the one before")
    value = meta.get("step")
    if not whole(value) or value != step or not 1 <= value <= max_steps:
        raise RunFileError(f"{where}: its metadata's step must be {step} (the checkpoint's "
                           f"number, between 1 and --max_steps {max_steps}), got "
                           f"{_shown(value)}; move this checkpoint away to resume from the one "
                           "before")
    if not isinstance(meta.get("data"), dict):
        raise RunFileError(f"{where}: its metadata's data position must be a mapping, got "
                           f"{_shown(meta.get('data'))}; move this checkpoint away to resume "
                           "from the one before")
    return meta
