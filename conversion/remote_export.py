"""``to-hf`` for models without a stock ``transformers`` class: a folder that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads.

It holds the generated ``configuration_*.py`` / ``modeling_*.py`` (:mod:`.remote_code`),
config.json with ``auto_map``, model.safetensors in the original's names (the tied head
stored once, as the embedding), generation_config.json and, where the run's tokenizer is
available offline, the tokenizer files.
"""

from __future__ import annotations

import inspect
import os

import numpy as np

from nanomoe.config import config_to_dict, model_type_of
from nanomoe.init import tied_names
from nanomoe.pt_source import Log, Source

from .hf_tokenizer import write_tokenizer
from .remote_code import REMOTE_MODELS, generate_files


def has_remote_export(config) -> bool:
    return model_type_of(config) in REMOTE_MODELS


def _eot(vocab_size: int) -> int | None:
    return 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>; none in bytes


def config_class(files: dict[str, str], model_type: str):
    """The generated configuration class, built from its text (our own generated code)."""
    spec = REMOTE_MODELS[model_type]
    namespace = {"__name__": spec.config_file[:-3]}
    exec(compile(files[spec.config_file], spec.config_file, "exec"), namespace)  # just generated
    return namespace[spec.config_class]


def hf_config(source: Source, files: dict[str, str]):
    model_type = model_type_of(source.config)
    spec, cls = REMOTE_MODELS[model_type], config_class(files, model_type)
    ours = config_to_dict(source.config)
    ours["rope_base"] = ours.pop("rope_scaling", None)  # transformers' rope_scaling is a dict
    accepted = inspect.signature(cls.__init__).parameters
    eot = _eot(source.config.vocab_size)
    cfg = cls(**{k: v for k, v in ours.items() if k in accepted and k != "model_type"},
              bos_token_id=eot, eos_token_id=eot)
    cfg.architectures = [spec.model_class]
    cfg.auto_map = spec.auto_map
    return cfg


def write_remote_folder(staging: str, source: Source, log: Log = print) -> str:
    """Everything transformers needs to run ``source`` with remote code, into ``staging``."""
    import torch  # torch, safetensors and transformers are optional (the hf extra)
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    c = source.config
    files = generate_files(model_type_of(c))
    os.makedirs(staging, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
            f.write(text)
    hf_config(source, files).save_pretrained(staging)
    lm_head, _ = tied_names(c)
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in source.arrays.items()
               if k != lm_head}
    save_file(tensors, os.path.join(staging, "model.safetensors"),
              metadata={"format": "pt", "step": str(source.step)})
    eot = _eot(c.vocab_size)
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(staging)
    return write_tokenizer(staging, source.meta.get("tokenizer"), c.vocab_size, c.block_size)
