"""The documents ``python -m nanomoe.prepare`` tokenises: local ``.txt`` files (one document
each), ``.jsonl`` (one per line, its "text" field), ``.parquet`` (its "text" column), folders of
them, or FineWeb-Edu through the ``datasets`` package.

pyarrow and datasets (the data extra) are imported where a .parquet file or FineWeb is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
FINEWEB = "HuggingFaceFW/fineweb-edu"


def find_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The input files: each path itself, or a folder's .txt/.jsonl/.parquet files (sorted)."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"input {path} does not exist: give .txt, .jsonl or .parquet files "
                            "or folders of them")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in INPUT_SUFFIXES)
            if not found:
                raise DataError(f"input folder {path} has no {'/'.join(INPUT_SUFFIXES)} files")
            files += found
        elif path.suffix in INPUT_SUFFIXES:
            files.append(path)
        else:
            raise DataError(f"input {path} is not a {'/'.join(INPUT_SUFFIXES)} file")
    return files


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n} is not a JSON object with a \"text\" field "
                                f"({type(e).__name__}): fix or remove that line") from e
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: \"text\" is a {type(text).__name__}, not a string")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    try:
        batches = pq.ParquetFile(path).iter_batches(columns=["text"])
        for batch in batches:
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors derive from these
        raise DataError(f"cannot read a \"text\" column from {path} ({e})") from e


def iter_documents(files: Iterable[Path]) -> Iterator[str]:
    """The documents of local files, in order."""
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _parquet_documents(path)


def fineweb_documents(name: str = "sample-10BT", streaming: bool = False) -> Iterator[str]:
    """FineWeb-Edu's documents via ``datasets`` (sample-10BT downloads ~27 GB unless streaming).

    Not a generator: a missing package or no network fails here, before any output is touched.
    """
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise DataError("--fineweb needs the datasets package: pip install datasets") from e
    try:
        ds = load_dataset(FINEWEB, name=name, split="train", streaming=streaming)
    except Exception as e:  # offline, unknown config, disk full, ...
        raise DataError(f"could not load {FINEWEB} ({name}): {type(e).__name__}: "
                        f"{str(e)[:200]} (it needs network access to the Hugging Face Hub)") from e
    return (doc["text"] for doc in ds)
