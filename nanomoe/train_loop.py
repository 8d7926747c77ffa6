"""The training loop both frameworks share: data, schedule, eval, checkpoints, logging.

A framework plugs in a backend (``nanomoe_jax.backend.JaxBackend``,
``nanomoe_torch.train.TorchBackend``) that builds the model and optimizer and runs one
optimizer step, evaluation, checkpointing, export and sampling. Everything a user sees or
compares across frameworks (batch order, lr per step, metric names, file layout) lives here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Protocol

import numpy as np

from . import failures, run_dir
from .atomic import atomic_write
from .cli import apply_cpu_preset, build_config, check_ranges, parse_args
from .config import ModelConfig, config_to_dict
from .data import data_format, default_tokenizer, open_dataset
from .loader import Prefetcher, eval_batches, make_loader
from . import hellaswag, next_steps
from .errors import CheckpointError, NanoMoeError, NonFiniteError
from .flops import device_peak_flops, flops_per_token
from .metrics import MetricsLogger
from .schedule import lr_at
from .tokenizer import TokenizerError, get_tokenizer

RUN_FILE = run_dir.RUN_FILE  # model type, config, framework, tokenizer, flags
# Test hook: make the learning rate infinite at this step (the step must then be refused).
NAN_HOOK = "NANOMOE_TEST_NAN_AT_STEP"


class TrainError(NanoMoeError, ValueError):
    """A training setup that cannot work (bad flags, a log folder of another run, ...)."""


class Backend(Protocol):
    name: str
    has_accelerator: bool
    async_dispatch: bool  # train_step returns before the device finishes
    device_name: str
    process_index: int
    process_count: int

    def setup(self, config: ModelConfig, args: argparse.Namespace) -> None: ...
    def load_weights(self, path: str) -> None: ...
    def train_step(self, x_ABT: np.ndarray, y_ABT: np.ndarray, lr: float) -> Any: ...
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


def _open_data(args) -> tuple[Any, dict]:
    """(tokenizer or None, {'train', 'val'}): data errors first; token shards need no tokenizer
    to train, so when the default GPT-2 one cannot load (offline) samples show token ids."""
    name = args.tokenizer or default_tokenizer(args.data)
    if data_format(args.data) in ("embedded", "text"):
        tokenizer = get_tokenizer(name)
        return tokenizer, {s: open_dataset(args.data, tokenizer, s) for s in ("train", "val")}
    datasets = {s: open_dataset(args.data, None, s) for s in ("train", "val")}
    try:
        return get_tokenizer(name), datasets
    except TokenizerError as e:
        if args.tokenizer:
            raise
        print(f"note: samples will show token ids ({e})", flush=True)
        return None, datasets


def model_vocab(tokenizer) -> int | None:
    """A byte or tokenizer.json vocabulary, padded to a multiple of 64; None: config default."""
    if tokenizer is None or tokenizer.name == "gpt2":
        return None
    return -(-tokenizer.vocab_size // 64) * 64


def run(argv: list[str], backend: Backend, early_signals: list[str] | None = None) -> dict:
    """Train as the flags say; returns a summary (final losses, paths) for tests and callers."""
    stop_signal, restore_handlers = failures.catch_stop_signals(early_signals)
    lock = None
    try:
        args = parse_args(argv)
        lock = run_dir.Lock(args.log_dir)
        return _run(args, argv, backend, stop_signal, lock)
    finally:
        if lock is not None:
            lock.release()
        restore_handlers()


def _run(args, argv, backend: Backend, stop_signal: list[str], lock: run_dir.Lock) -> dict:
    def stop_if_asked() -> None:  # before the log folder is touched
        if stop_signal:
            raise failures.Interrupted(stop_signal[0], args.log_dir)

    preset = not backend.has_accelerator and apply_cpu_preset(args, argv)
    check_ranges(args)
    args.dtype = args.dtype or ("bfloat16" if backend.has_accelerator else "float32")
    if preset:
        print(f"No accelerator found ({backend.device_name}): using the CPU preset "
              f"(n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} B={args.B} "
              f"T={args.T} max_steps={args.max_steps}); pass any size flag to choose your own.",
              flush=True)

    tokenizer, datasets = _open_data(args)
    config = build_config(args, model_vocab(tokenizer))
    if args.T > config.block_size:
        raise TrainError(f"--T {args.T} is longer than block_size={config.block_size}; "
                         f"use --T <= {config.block_size} or a larger --block_size")
    # world = data-parallel ranks: processes x devices each (JAX drives all local devices)
    per_process = getattr(backend, "devices_per_process", 1)
    world = backend.process_count * per_process
    tokens_per_micro = args.B * args.T * world
    if args.total_batch_size % tokens_per_micro:
        raise TrainError(f"--total_batch_size {args.total_batch_size} is not divisible by "
                         f"B*T*world_size = {args.B}*{args.T}*{world} = {tokens_per_micro}; "
                         "choose a multiple")
    grad_accum = args.total_batch_size // tokens_per_micro
    # A process reads the rows of its consecutive ranks as one window: B*per_process rows
    # from rank offset process_index (the same tokens the original's per-rank loaders read).
    rank, n_proc, rows = backend.process_index, backend.process_count, args.B * per_process

    def loader(split: str):
        # every batch's ids are checked against the vocabulary (a cheap min/max on the host)
        order = args.data_order if split == "train" else "sequential"
        return make_loader(order, datasets[split], rows, args.T, rank, n_proc, config.vocab_size,
                           args.seed)

    train_loader, val_loader = loader("train"), loader("val")
    # Everything that can reject the input runs before the log folder is touched.
    for split in ("train", "val"):  # the first batch of each split, read ahead
        loader(split).next_batch()
    run_info = {"model_type": args.model, "config": config_to_dict(config),
                "framework": backend.name,
                "tokenizer": tokenizer.name if tokenizer else args.tokenizer or "gpt2",
                "flags": run_dir.compute_flags(args)}
    leader = rank == 0
    if leader and os.path.isdir(args.log_dir):  # a run in progress there: say so first
        lock.acquire()
    run_dir.check(args, run_info)
    if leader:
        run_dir.check_writable(args.log_dir)
    if not backend.has_accelerator:
        failures.check_host_memory(config)
    hellaswag_file = None
    if args.do_hellaswag:
        if tokenizer is None:
            raise TrainError("--do_hellaswag needs the data's tokenizer: pass --tokenizer")
        hellaswag_file = hellaswag.find_or_download(
            args.hellaswag_file, os.path.expanduser("~/.cache/nanomoe"))

    stop_if_asked()
    backend.setup(config, args)
    stop_if_asked()
    if leader and not lock.held:  # a new folder: lock it, then look again (another run may
        lock.acquire()             # have begun there since the check above)
        run_dir.check(args, run_info)
    start_step = 0
    if args.resume:
        latest = backend.latest_checkpoint(args.log_dir)
        if latest is None:
            raise TrainError(f"--resume: no complete checkpoint in {args.log_dir}; start it "
                             "again with --overwrite")
        try:
            meta = backend.restore(args.log_dir, latest)
        except NanoMoeError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
            raise CheckpointError(f"--resume: the checkpoint of step {latest} in {args.log_dir} "
                                  f"cannot be read ({type(e).__name__}); move it away to resume "
                                  "from the one before") from None
        start_step = meta["step"]
        train_loader.load_state_dict(meta["data"])
        print(f"Resumed {args.log_dir} at step {start_step}", flush=True)
    elif args.init_from:
        backend.load_weights(args.init_from)
    stop_if_asked()
    if leader:
        if args.overwrite and not args.resume:
            removed = run_dir.clear_previous_run(args.log_dir)
            if removed:
                print(f"--overwrite: removed the previous run in {args.log_dir} "
                      f"({', '.join(removed)})", flush=True)
        atomic_write(os.path.join(args.log_dir, RUN_FILE),
                     lambda tmp: _write_json(tmp, run_info))

    if leader:
        where = getattr(backend, "placement", "") or f"{world} rank(s)"
        print(f"{backend.name} on {backend.device_name} ({where}): {args.model} {config}\n"
              f"tokenizer {tokenizer.name if tokenizer else 'ids'}, grad accumulation {grad_accum}, "
              f"{args.total_batch_size:,} tokens per step", flush=True)
    logger = MetricsLogger(args.log_dir, args.max_steps, start_step, use_wandb=args.wandb,
                           run_name=args.run_name, enabled=leader,
                           wandb_config={**vars(args), **run_info})
    peak = device_peak_flops(backend.device_name) if backend.has_accelerator else None
    flops_per_step = flops_per_token(config, args.T) * args.total_batch_size
    prefetch = Prefetcher(train_loader, depth=2)

    def evaluate(step_done: int) -> None:
        batches = eval_batches(val_loader, args.eval_steps)  # one batch in memory at a time
        record = {"step": step_done, **{f"val_{k}": v for k, v in backend.evaluate(batches).items()},
                  "val_tokens": len(batches) * tokens_per_micro}
        line = (f"step {step_done:5d} | val loss {record['val_loss']:.4f} "
                f"({record['val_tokens']:,} tokens)")
        if hellaswag_file:
            scores = hellaswag.evaluate(backend.logits, hellaswag_file, tokenizer,
                                        max_len=config.block_size, limit=args.hellaswag_limit)
            record["hellaswag_acc"] = scores["acc_norm"]
            line += f" | hellaswag acc_norm {scores['acc_norm']:.4f} ({scores['n']} examples)"
        logger.log(record)
        if leader:
            print(line, flush=True)
            logger.plot()

    def sample(step_done: int) -> None:
        # every process samples (a multi-host JAX model is one program), the leader prints
        prompt = [0] if tokenizer is None else list(tokenizer.encode(args.sample_prompt))
        out = backend.sample(prompt, args.sample_tokens, top_k=50, temperature=1.0, seed=args.seed)
        if not leader:
            return
        if tokenizer is None:  # token shards whose tokenizer is unavailable: show ids
            print(f"sample at step {step_done} (token ids): {out}", flush=True)
        else:
            print(f"sample at step {step_done}: {tokenizer.decode(prompt + out)!r}", flush=True)

    pending = None  # (step, handle, lr): the previous step's metrics, read one step late
    t_last = time.time()
    summary: dict[str, Any] = {"losses": {}, "interrupted": None}
    skipped = 0
    last_good = f"step {start_step} in {args.log_dir}" if start_step else None
    nan_step = int(os.environ.get(NAN_HOOK, -1))

    def flush() -> None:
        nonlocal pending, t_last
        if pending is None:
            return
        step, handle, lr = pending
        pending = None
        nonlocal skipped
        metrics = backend.fetch(handle)
        if metrics.get("skipped"):
            skipped += 1
            if skipped > args.skip_nonfinite:
                raise NonFiniteError(
                    f"step {step}: the loss is {metrics['loss']:.4g} and the gradient norm "
                    f"{metrics['grad_norm']:.4g}, so the step was not applied; the last good "
                    f"checkpoint is {last_good or 'none (no checkpoint yet)'}: continue from it "
                    "with --resume, perhaps with a lower --max_lr, or allow bad steps with "
                    "--skip_nonfinite N")
            print(f"step {step}: non-finite loss or gradient, step skipped "
                  f"({skipped}/{args.skip_nonfinite})", flush=True)
        metrics["skipped_steps"] = skipped
        now = time.time()
        dt = now - t_last
        t_last = now
        record = {"step": step, **metrics, "lr": lr, "dt_ms": 1000 * dt,
                  "tokens_per_sec": args.total_batch_size / dt}
        if peak:
            record["mfu"] = flops_per_step / dt / peak
        summary["losses"][step] = metrics["loss"]
        logger.log(record)
        logger.progress(record)

    try:
        for step in range(start_step, args.max_steps):
            if step % args.eval_interval == 0:
                flush()
                evaluate(step)
            if args.sample_every and step > 0 and step % args.sample_every == 0:
                flush()
                sample(step)
            batches = [prefetch.next_batch() for _ in range(grad_accum)]
            x_ABT = np.stack([b[0] for b in batches])
            y_ABT = np.stack([b[1] for b in batches])
            lr = lr_at(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
            if step == nan_step:
                lr = float("inf")
            handle = backend.train_step(x_ABT, y_ABT, lr)
            flush()  # the previous step's metrics: the device already works on this one
            pending = (step, handle, lr)
            if not backend.async_dispatch:
                flush()  # the step ran to completion inside train_step
            done = step + 1
            stop = (args.stop_at is not None and done >= args.stop_at) or bool(stop_signal)
            if done % args.ckpt_interval == 0 or done == args.max_steps or stop:
                flush()
                backend.save(args.log_dir, done, {"step": done, "data": prefetch.state_dict(),
                                                  **run_info})
                last_good = f"step {done} in {args.log_dir}"
            if stop_signal:
                summary["interrupted"] = stop_signal[0]
                break
            if stop:
                break
        flush()
    except BaseException:
        backend.finish()  # let an in-flight checkpoint complete: it is the last good one
        raise
    finally:
        prefetch.close()
    if summary["interrupted"]:
        print(f"Stopped by {summary['interrupted']} after step {done}; the checkpoint is saved. "
              f"Continue with the same command plus --resume.", flush=True)
        logger.close()
        backend.finish()
        summary.update(config=config, log_dir=args.log_dir, records=logger.records)
        return summary
    stopped = args.stop_at is not None and args.stop_at < args.max_steps
    if stopped:
        print(f"Stopped after step {args.stop_at} as asked; continue with the same flags and "
              "--resume.", flush=True)
        logger.close()
        backend.finish()
        summary.update(config=config, log_dir=args.log_dir, records=logger.records)
        return summary
    if args.max_steps > start_step:
        evaluate(args.max_steps)
    final = os.path.join(args.log_dir, "model_final.pt")
    backend.export_final(final, args.max_steps)  # every process takes part, rank 0 writes
    summary["model_final"] = final
    sample(args.max_steps)
    if leader:
        logger.plot()
    logger.close()
    backend.finish()
    if leader:
        print(next_steps.text(args, backend.name, run_info["tokenizer"]), flush=True)
    summary.update(config=config, log_dir=args.log_dir, records=logger.records)
    return summary


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def main(argv: list[str], make_backend, early_signals: list[str] | None = None) -> int:
    """Entry point with the project's error handling (see failures.report): one sentence and
    exit 2 on bad input or a disk, permission or memory failure."""
    try:
        backend = make_backend()
        run(argv, backend, early_signals)
    except Exception as e:  # noqa: BLE001 - report() re-raises what it cannot explain
        return failures.report(e, debug="--debug" in argv)
    return 0
