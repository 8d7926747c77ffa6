"""Sampling from a reference model: top-k / temperature, as the original samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanomoe.config import config_from_dict
from nanomoe.errors import ConversionError
from nanomoe.pt_files import load_checkpoint_file

from . import model_class


@torch.no_grad()
def generate(model, prompt: list[int], n_tokens: int, *, top_k: int | None = 50,
             temperature: float = 1.0, seed: int = 0) -> list[int]:
    """``n_tokens`` continuation tokens of ``prompt``, any number: as nanoGPT's generate, each
    token is predicted from (at most) the last block_size tokens, the window sliding on."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    block_size = model.config.block_size
    idx = torch.tensor([prompt[-block_size:]], device=device)
    start = idx.size(1)
    for _ in range(max(n_tokens, 0)):
        logits = model(idx[:, -block_size:])[0][:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                vals, ids = torch.topk(logits, top_k, dim=-1)
                nxt = torch.gather(ids, -1, torch.multinomial(F.softmax(vals, -1), 1, generator=g))
            else:
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0, start:].tolist()


def load_for_sampling(path: str):
    """A .pt file in the original's format with our plain-dict config (model_final.pt)."""
    ckpt = load_checkpoint_file(path)
    if (not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict)
            or "model_type" not in ckpt["config"] or not isinstance(ckpt.get("model"), dict)):
        raise ConversionError(f"{path}: its config is not ours; convert it first with "
                              "python -m conversion")
    config = config_from_dict(ckpt["config"])
    model = model_class(config)(config)
    model.load_original_state_dict(ckpt["model"])
    return model.eval(), {}


if __name__ == "__main__":
    import sys

    from nanomoe.sampling_cli import main

    from .threads import choose_cpu_threads

    choose_cpu_threads(sys.stderr)  # stdout is the sample
    sys.exit(main("python -m nanomoe_torch.sample", load_for_sampling,
                  lambda m, ids, a, seed: generate(m, ids, a.max_new_tokens, top_k=a.top_k,
                                                   temperature=a.temperature, seed=seed)))
