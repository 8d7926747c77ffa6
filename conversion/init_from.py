"""``train.py --init_from PATH``: the weights of any checkpoint this project reads, Hugging Face
GPT-2 included (imported through ``from-hf`` first), under the original's names."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from nanomoe.errors import ConversionError

from .checkpoints import is_pretrained_folder, load_source
from .hf import from_hf
from nanomoe.pt_files import read_config_json


def init_arrays(path: str) -> dict[str, np.ndarray]:
    """Weights for ``train.py --init_from PATH`` in the original's names: a JAX checkpoint, a
    .pt file (the original's or ours), one of our safetensors folders, or Hugging Face GPT-2
    (a local folder, or a hub name such as ``gpt2`` when the hub is reachable)."""
    if not os.path.exists(path) and os.path.lexists(path):
        raise ConversionError(f"--init_from {path}: a link to nothing")
    hf_folder = (os.path.isdir(path) and read_config_json(path) is not None
                 and not is_pretrained_folder(path))
    if os.path.exists(path) and not hf_folder:
        return load_source(path, log=lambda *_: None).arrays
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "imported")
        from_hf(path, out, log=lambda *_: None)
        return load_source(out, log=lambda *_: None).arrays
