"""Files that appear only when complete: write to a temporary name, then rename."""

from __future__ import annotations

import os
from typing import Callable

from .errors import CheckpointError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, then rename onto ``path``. A crash or a full disk never leaves a
    partial file under ``path``, and whatever was there stays intact."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); free some disk "
                              "space or choose another --log_dir; the previous checkpoint is "
                              "intact") from None


def atomic_torch_save(payload, path: str) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))
