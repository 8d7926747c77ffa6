"""The PyTorch backend of nanomoe.train_loop, as the original's loop: autocast bf16,
torch.compile and fused AdamW on CUDA (nanomoe_torch/train.py), gradient accumulation,
clipping, DDP under torchrun, .pt checkpoints."""

from __future__ import annotations

import math
import os
import re
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conversion.init_from import init_arrays
from nanomoe.pt_files import load_checkpoint_file
from nanomoe.atomic import atomic_torch_save, check_free_space
from nanomoe.config import config_to_dict
from nanomoe.errors import ConversionError, NonFiniteError
from nanomoe_torch import create_model
from nanomoe_torch.ngpt import normalize_weights
from nanomoe_torch.sample import generate
from nanomoe_torch.train import make_optimizer

CKPT = re.compile(r"model_(\d{6})\.pt")


class TorchBackend:
    name = "torch"

    def __init__(self):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.has_accelerator = self.device == "cuda"
        self.async_dispatch = self.has_accelerator  # CUDA kernels queue; CPU ops run in place
        self.process_index, self.process_count = 0, 1
        # torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (or CPU process), as
        # the original: NCCL on CUDA, gloo on CPU
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.has_accelerator else "gloo")
            self.process_index, self.process_count = dist.get_rank(), dist.get_world_size()
            if self.has_accelerator:
                self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(self.device)
        self.device_name = torch.cuda.get_device_name() if self.has_accelerator else "cpu"
        self.placement = f"DDP over {self.process_count} processes" if self.ddp else ""

    def device_memory(self) -> int | None:
        """Bytes the GPU holds (for the size check before setup)."""
        return torch.cuda.mem_get_info(self.device)[1] if self.has_accelerator else None

    def setup(self, config, args) -> None:
        """The execution (autocast), the model, its optimizer, and the compiled forward: the
        steps of JaxBackend.setup that torch has."""
        self.config, self.args = config, args
        self.autocast = self._choose_execution(args)
        self.model = self._build_model(config, args)
        self._build_optimizer(config, args)
        self._compile()

    def _choose_execution(self, args):
        dtype = args.dtype or ("bfloat16" if self.has_accelerator else "float32")
        return (torch.autocast(device_type=self.device, dtype=torch.bfloat16)
                if dtype == "bfloat16" else nullcontext())

    def _build_model(self, config, args):
        model = create_model(config, args.seed).to(self.device)
        # nGPT's --ngpt_normalize_weights: the paper's projection after every applied step
        self.post_step = normalize_weights if getattr(args, "ngpt_normalize_weights", False) else None
        return model

    def _build_optimizer(self, config, args) -> None:
        self.optimizer = make_optimizer(self.model, config, args.embedding_lr_mult,
                                        fused=self.has_accelerator,
                                        betas=(args.beta1, args.beta2),
                                        weight_decay=args.weight_decay)

    def _compile(self) -> None:
        forward = torch.compile(self.model) if self.has_accelerator else self.model
        if self.ddp:  # the original wraps the compiled model
            forward = DDP(forward, device_ids=[self.device] if self.has_accelerator else None)
        self.forward = forward

    def _all_mean(self, values: dict) -> dict:
        """Average scalars over the ranks (gloo has no AVG: sum, then divide)."""
        if not self.ddp:
            return values
        keys = sorted(values)
        flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device)
                            for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return {k: v / self.process_count for k, v in zip(keys, flat)}

    def load_weights(self, path: str) -> None:
        """--init_from: see conversion.init_from.init_arrays for what PATH may be."""
        try:
            self.model.load_original_state_dict(
                {k: torch.from_numpy(np.array(v)) for k, v in init_arrays(path).items()})
        except RuntimeError as e:  # torch lists the missing, unexpected and mis-shaped keys
            raise ConversionError(f"{path}: weights do not fit {type(self.model).__name__}: "
                                  f"{e}") from None

    def _batch(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).long().to(self.device, non_blocking=True)

    def _losses(self, x, y) -> dict:
        with self.autocast:
            out = self.forward(x, y)
        return out[1]

    def train_step(self, x_WBT, y_WBT, lr):
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        W = x_WBT.shape[0]
        sums: dict[str, torch.Tensor] = {}
        for w in range(W):
            if self.ddp:  # all-reduce the gradients on the last micro-batch only
                self.forward.require_backward_grad_sync = w == W - 1
            losses = self._losses(self._batch(x_WBT[w]), self._batch(y_WBT[w]))
            (losses["loss"] / W).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / W
        sums = self._all_mean(sums)  # the logged loss is the mean over ranks, as the original
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        # A step with a non-finite loss, gradient or lr is not applied (as the JAX step); the
        # host decides whether to stop. The check is one small sync per step.
        ok = bool(torch.isfinite(sums["loss"]) & torch.isfinite(sums["grad_norm"])) and \
            math.isfinite(lr)
        if ok:
            self.optimizer.step()
            if self.post_step is not None:
                self.post_step(self.model)
        sums["skipped"] = torch.tensor(0.0 if ok else 1.0)
        return sums

    def fetch(self, handle) -> dict[str, float]:
        return {k: float(v) for k, v in handle.items()}

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        self.model.eval()
        totals: dict[str, float] = {}
        for x, y in batches:
            for k, v in self._losses(self._batch(x), self._batch(y)).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        return {k: float(v) for k, v in self._all_mean(totals).items()}

    @torch.no_grad()
    def logits(self, tokens_BT: np.ndarray) -> np.ndarray:
        self.model.eval()
        with self.autocast:
            out = self.model(self._batch(tokens_BT))[0]
        return out.float().cpu().numpy()

    # checkpoints: the original's model_{step:06d}.pt plus what exact resume needs
    def save(self, log_dir: str, step: int, meta: dict) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteError(f"the weights after step {step} are not finite; "
                                 "not saving them")
        if self.process_index == 0:  # ranks hold the same weights: rank 0 writes
            path = os.path.join(log_dir, f"model_{step:06d}.pt")
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            check_free_space(log_dir, 3 * weights + 2**20, f"the checkpoint of step {step}")
            payload = {"model": self.model.state_dict(), "config": config_to_dict(self.config),
                       "step": step, "optimizer": self.optimizer.state_dict(), "meta": meta}
            atomic_torch_save(payload, path)  # visible only when complete
            for old in self._checkpoints(log_dir)[: -self.args.keep_checkpoints]:
                os.remove(os.path.join(log_dir, f"model_{old:06d}.pt"))
        if self.ddp:
            dist.barrier()  # no rank goes on (or exits) before the checkpoint exists

    @staticmethod
    def _checkpoints(log_dir: str) -> list[int]:
        # the folder is listed, never globbed: a --log_dir such as run[1] is a name
        names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
        steps = [int(m.group(1)) for n in names if (m := CKPT.fullmatch(n))]
        return sorted(steps)

    def latest_checkpoint(self, log_dir: str) -> int | None:
        steps = self._checkpoints(log_dir)
        return steps[-1] if steps else None

    def restore(self, log_dir: str, step: int) -> dict:
        ckpt = load_checkpoint_file(os.path.join(log_dir, f"model_{step:06d}.pt"))
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt["meta"]

    def export_final(self, path: str, step: int) -> None:
        if self.process_index != 0:
            return
        payload = {"model": self.model.state_dict(), "config": config_to_dict(self.config),
                   "step": step}
        atomic_torch_save(payload, path)

    def sample(self, prompt, n_tokens, top_k, temperature, seed):
        self.model.eval()
        return generate(self.model, prompt, n_tokens, top_k=top_k, temperature=temperature,
                        seed=seed)

    def finish(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
