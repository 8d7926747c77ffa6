"""The training loop both frameworks share: data, schedule, eval, checkpoints, logging.

A framework plugs in a backend (``nanomoe_train.jax_backend.JaxBackend``,
``nanomoe_train.torch_backend.TorchBackend``) that builds the model and optimizer and runs one
optimizer step, evaluation, checkpointing, export and sampling. Everything a user sees or
compares across frameworks (batch order, lr per step, metric names, file layout) lives here;
what runs before the first step is in train_setup.py, evaluation and sampling in
train_eval.py, each step's metrics in step_log.py.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

import numpy as np

from . import data_fingerprint, failures, run_dir
from .cli import build_config, parse_args
from .config import ModelConfig, config_to_dict
from .flops import device_peak_flops, flops_per_token
from .metrics import MetricsLogger
from .prefetch import Prefetcher
from .schedule import lr_at
from .step_log import StepLog
from .train_eval import Run, close_run, evaluate, finish_run, sample
from .train_setup import model_vocab
from . import train_setup as setup


class Backend(Protocol):
    name: str
    has_accelerator: bool
    async_dispatch: bool  # train_step returns before the device finishes
    device_name: str
    process_index: int
    process_count: int

    def setup(self, config: ModelConfig, args: argparse.Namespace) -> None: ...
    def load_weights(self, path: str) -> None: ...
    def train_step(self, x_WBT: np.ndarray, y_WBT: np.ndarray, lr: float) -> Any: ...
    def fetch(self, handle: Any) -> dict[str, float]: ...
    def evaluate(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]: ...
    def logits(self, tokens_BT: np.ndarray) -> np.ndarray: ...
    def save(self, log_dir: str, step: int, meta: dict) -> None: ...
    def latest_checkpoint(self, log_dir: str) -> int | None: ...
    def restore(self, log_dir: str, step: int) -> dict: ...
    def export_final(self, path: str, step: int) -> None: ...
    def sample(self, prompt: list[int], n_tokens: int, top_k: int, temperature: float,
               seed: int) -> list[int]: ...
    def finish(self) -> None: ...


def run(argv: list[str], backend: Backend, early_signals: list[str] | None = None) -> dict:
    """Train as the flags say; returns a summary (final losses, paths) for tests and callers."""
    stop_signal, restore_handlers = failures.catch_stop_signals(early_signals)
    lock = None
    try:
        args = parse_args(argv)
        lock = run_dir.Lock(args.log_dir)
        return _run(args, argv, backend, stop_signal, lock)
    except BaseException:
        if hasattr(backend, "close"):  # background writers stopped before the one sentence
            backend.close()
        raise
    finally:
        if lock is not None:
            lock.release()
        restore_handlers()


def _run(args, argv, backend: Backend, stop_signal: list[str], lock: run_dir.Lock) -> dict:
    def stop_if_asked() -> None:  # before the log folder is touched
        if stop_signal:
            raise failures.Interrupted(stop_signal[0], args.log_dir)

    setup.apply_defaults(args, argv, backend)
    tokenizer, datasets = setup.open_data(args)
    config = build_config(args, model_vocab(tokenizer))
    world, tokens_per_micro, grad_accum = setup.batch_layout(args, config, backend)
    train_loader, val_loader = setup.make_loaders(args, datasets, config, backend)
    run_info = {"model_type": args.model, "config": config_to_dict(config),
                "framework": backend.name,
                "tokenizer": tokenizer.name if tokenizer else args.tokenizer or "gpt2",
                "flags": run_dir.compute_flags(args),
                "data_files": data_fingerprint.fingerprints(args.data)}
    leader = backend.process_index == 0
    setup.check_run_folder(args, run_info, lock, leader, config, backend)
    setup.check_sample_prompt(args, tokenizer, config)
    hellaswag_file = setup.find_hellaswag(args, tokenizer, config)

    stop_if_asked()
    backend.setup(config, args)
    stop_if_asked()
    if leader and not lock.held:  # a new folder: lock it, then look again (another run may
        lock.acquire()             # have begun there since the check above)
        run_dir.check(args, run_info)
    start_step = setup.load_start(args, backend, train_loader)
    stop_if_asked()
    if leader:
        setup.start_log_dir(args, run_info)
        where = getattr(backend, "placement", "") or f"{world} rank(s)"
        print(f"{backend.name} on {backend.device_name} ({where}): {args.model} {config}\n"
              f"tokenizer {tokenizer.name if tokenizer else 'ids'}, grad accumulation {grad_accum}, "
              f"{args.total_batch_size:,} tokens per step", flush=True)
    logger = MetricsLogger(args.log_dir, args.max_steps, start_step, use_wandb=args.wandb,
                           run_name=args.run_name, enabled=leader,
                           wandb_config={**vars(args), **run_info})
    r = Run(args, backend, config, tokenizer, run_info, leader, logger, val_loader,
            tokens_per_micro, hellaswag_file)
    return _train(r, train_loader, start_step, grad_accum, stop_signal)


def _train(r: Run, train_loader, start_step: int, grad_accum: int,
           stop_signal: list[str]) -> dict:
    """Steps start_step .. max_steps (or until --stop_at or a signal), then the run's end."""
    args, backend = r.args, r.backend
    peak = device_peak_flops(backend.device_name) if backend.has_accelerator else None
    flops_per_step = flops_per_token(r.config, args.T) * args.total_batch_size
    prefetch = Prefetcher(train_loader, depth=2)
    summary: dict[str, Any] = {"losses": {}, "interrupted": None}
    steps = StepLog(args, backend, r.logger, summary["losses"], start_step, flops_per_step, peak)
    done = start_step  # steps done (the step printed last is done - 1)
    try:
        for step in range(start_step, args.max_steps):
            if step % args.eval_interval == 0:
                steps.flush()
                evaluate(r, step)
            if args.sample_every and step > 0 and step % args.sample_every == 0:
                steps.flush()
                sample(r, step)
            x_WBT, y_WBT = _micro_batches(prefetch, grad_accum)
            lr = lr_at(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
            steps.submit(step, backend.train_step(x_WBT, y_WBT, lr), lr)  # read one step late
            done = step + 1
            stop = (args.stop_at is not None and done >= args.stop_at) or bool(stop_signal)
            if done % args.ckpt_interval == 0 or done == args.max_steps or stop:
                steps.flush()
                backend.save(args.log_dir, done, {"step": done, "data": prefetch.state_dict(),
                                                  **r.run_info})
                steps.saved(done, args.log_dir)
            if stop_signal:
                summary["interrupted"] = stop_signal[0]
                break
            if stop:
                break
        steps.flush()
    except BaseException:
        backend.finish()  # let an in-flight checkpoint complete: it is the last good one
        raise
    finally:
        prefetch.close()
    return _end(r, summary, start_step, done)


def _micro_batches(prefetch: Prefetcher, grad_accum: int) -> tuple[np.ndarray, np.ndarray]:
    """One optimizer step's grad_accum micro-batches, stacked: (W, B, T) inputs and targets."""
    batches = [prefetch.next_batch() for _ in range(grad_accum)]
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


def _end(r: Run, summary: dict, start_step: int, done: int) -> dict:
    """Stopped early (a signal, --stop_at): say how to continue; else the run's last steps."""
    if summary["interrupted"]:
        print(f"Stopped by {summary['interrupted']} after {done} steps (the last printed: step "
              f"{done - 1}); the checkpoint is saved. "
              f"Continue with the same command plus --resume.", flush=True)
        return close_run(r, summary)
    if r.args.stop_at is not None and r.args.stop_at < r.args.max_steps:
        print(f"Stopped after {done} steps as asked (the last printed: step {done - 1}); "
              "continue with the same flags and "
              "--resume.", flush=True)
        return close_run(r, summary)
    return finish_run(r, summary, start_step)


def main(argv: list[str], make_backend, early_signals: list[str] | None = None) -> int:
    """Entry point with the project's error handling (see failures.report): one sentence and
    exit 2 on bad input or a disk, permission or memory failure."""
    try:
        backend = make_backend()
        run(argv, backend, early_signals)
    except Exception as e:  # noqa: BLE001 - report() re-raises what it cannot explain
        return failures.report(e, debug="--debug" in argv)
    return 0
