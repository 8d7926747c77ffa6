"""The PyTorch side of training, as the original configures it: AdamW with its parameter
groups. The backend train_loop drives (the step, DDP, .pt checkpoints) is
``nanomoe_train.torch_backend.TorchBackend``."""

from __future__ import annotations

import torch

from nanomoe.config import MoeGPTConfig


def make_optimizer(model, config, lr_mult_embedding: float, fused: bool,
                   betas=(0.9, 0.95), weight_decay: float = 0.1):
    """AdamW (the original's betas 0.9, 0.95, eps 1e-8, decay 0.1), decay on ndim >= 2 only;
    MoeGPT's embedding undecayed."""
    decay, no_decay, embedding = [], [], []
    for name, p in model.named_parameters():
        if isinstance(config, MoeGPTConfig) and "wte" in name:
            embedding.append(p)
        elif "wte" in name and lr_mult_embedding != 1.0:
            embedding.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if embedding:
        wd = 0.0 if isinstance(config, MoeGPTConfig) else weight_decay
        groups.append({"params": embedding, "weight_decay": wd, "lr_mult": lr_mult_embedding})
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), eps=1e-8, fused=fused)
