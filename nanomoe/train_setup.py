"""Before the first step of nanomoe.train_loop: flags, data, batch layout, the run folder,
resume. Everything that can reject the input runs before the log folder is touched."""

from __future__ import annotations

import json
import os
from typing import Any

from . import config_checks, flag_checks, hellaswag, run_dir, run_files
from .atomic import atomic_write
from .cli import apply_cpu_preset, check_ranges
from .data import data_format, default_tokenizer, open_dataset
from .errors import CheckpointError, DataError, NanoMoeError, TrainError
from .loader import AllWindows, make_loader
from .tokenizer import TokenizerError, get_tokenizer

RUN_FILE = run_dir.RUN_FILE  # model type, config, framework, tokenizer, flags


def apply_defaults(args, argv: list[str], backend) -> None:
    """The CPU preset where there is no accelerator, range checks, the default dtype."""
    preset = not backend.has_accelerator and apply_cpu_preset(args, argv)
    check_ranges(args)
    flag_checks.check_flags(args)
    args.eval_steps_given = any(a.split("=")[0] == "--eval_steps" for a in argv)
    args.dtype = args.dtype or ("bfloat16" if backend.has_accelerator else "float32")
    if preset:
        print(f"No accelerator found ({backend.device_name}): using the CPU preset "
              f"(n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} B={args.B} "
              f"T={args.T} max_steps={args.max_steps}); pass any size flag to choose your own.",
              flush=True)


def open_data(args) -> tuple[Any, dict]:
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


def batch_layout(args, config, backend) -> tuple[int, int, int]:
    """(world, tokens per micro-batch, gradient accumulation steps), checked against the flags."""
    if args.T > config.block_size:
        raise TrainError(f"--T {args.T} is longer than block_size={config.block_size}; "
                         f"use --T <= {config.block_size} or a larger --block_size")
    # world = data-parallel ranks: processes x devices each (JAX drives all local devices)
    world = backend.process_count * getattr(backend, "devices_per_process", 1)
    tokens_per_micro = args.B * args.T * world
    if args.total_batch_size % tokens_per_micro:
        raise TrainError(f"--total_batch_size {args.total_batch_size} is not divisible by "
                         f"B*T*world_size = {args.B}*{args.T}*{world} = {tokens_per_micro}; "
                         "choose a multiple")
    return world, tokens_per_micro, args.total_batch_size // tokens_per_micro


def make_loaders(args, datasets: dict, config, backend) -> tuple[Any, Any]:
    """(train, val) loaders of this process; the first batch of each split is read once here,
    so bad data is reported before anything is written."""
    # A process reads the rows of its consecutive ranks as one window: B*per_process rows
    # from rank offset process_index (the same tokens the original's per-rank loaders read).
    rank, n_proc = backend.process_index, backend.process_count
    rows = args.B * getattr(backend, "devices_per_process", 1)

    def loader(split: str):
        # every batch's ids are checked against the vocabulary (a cheap min/max on the host)
        order = args.data_order if split == "train" else "sequential"
        return make_loader(order, datasets[split], rows, args.T, rank, n_proc, config.vocab_size,
                           args.seed)

    train_loader, val_loader = loader("train"), loader("val")
    check_eval_steps(args, val_loader)
    for split in ("train", "val"):  # the first batch of each split, read ahead
        loader(split).next_batch()
    return train_loader, val_loader


def check_eval_steps(args, val_loader) -> None:
    """An --eval_steps past the val split's batches would score the same tokens again (the
    loader wraps), and a huge one would never finish its first eval. Only a value given on
    the command line is checked: the defaults (the original's 20, the CPU preset's 4) have
    always run on small data as they are."""
    steps = args.eval_steps
    if steps == "all" or not getattr(args, "eval_steps_given", True):
        return
    windows = len(AllWindows(val_loader))
    if steps > windows:
        raise TrainError(f"--eval_steps {steps} is more than the {windows} batches of the val "
                         f"split (more would score the same tokens again): use --eval_steps "
                         f"{windows} or --eval_steps all")


def check_run_folder(args, run_info: dict, lock: run_dir.Lock, leader: bool, config,
                     backend) -> None:
    """The log folder fits this run and is writable; the host has memory for the model."""
    if leader and os.path.isdir(args.log_dir):  # a run in progress there: say so first
        lock.acquire()
    run_dir.check(args, run_info)
    flag_checks.check_init_from_survives(args)
    if leader:
        run_dir.check_writable(args.log_dir)
    check_memory(args, config, backend)


def check_memory(args, config, backend) -> None:
    """The run fits the memory it will use: the host's, or the device's when the backend
    can say (a device that cannot is left to report out-of-memory itself)."""
    world = backend.process_count * getattr(backend, "devices_per_process", 1)
    if backend.has_accelerator:
        device_memory = getattr(backend, "device_memory", None)
        free = device_memory() if device_memory else None
        where = f"on {backend.device_name}"
    else:
        free, where = config_checks.host_memory()
    config_checks.check_memory(config, args, free, where, world,
                               device=backend.has_accelerator)


def check_sample_prompt(args, tokenizer, config) -> None:
    """The sample prompt becomes tokens the model has: checked now, not after training."""
    if tokenizer is None:
        return  # samples start from token 0 and show ids
    ids = list(tokenizer.encode(args.sample_prompt))
    if not ids:
        raise TrainError(f"--sample_prompt {args.sample_prompt!r} encodes to no tokens with the "
                         f"{tokenizer.name} tokenizer: give some text")
    if max(ids) >= config.vocab_size:
        raise TrainError(f"--sample_prompt encodes to token id {max(ids)}, beyond the model's "
                         f"vocab_size {config.vocab_size}: give a larger --vocab_size or "
                         "another prompt")


def find_hellaswag(args, tokenizer, config) -> str | None:
    """The HellaSwag file, every example it will score read once now (a bad line is an
    error before training, not at the first eval)."""
    if not args.do_hellaswag:
        return None
    if tokenizer is None:
        raise TrainError("--do_hellaswag needs the data's tokenizer: pass --tokenizer")
    path = hellaswag.find_or_download(args.hellaswag_file,
                                      os.path.expanduser("~/.cache/nanomoe"))
    hellaswag.check_file(path, tokenizer, config.block_size, args.hellaswag_limit)
    return path


def load_start(args, backend, train_loader) -> int:
    """The step to start from: --resume's latest checkpoint (weights, optimizer, data order),
    or 0 with --init_from's weights or the backend's fresh ones."""
    if not args.resume:
        if args.init_from:
            backend.load_weights(args.init_from)
        return 0
    latest = backend.latest_checkpoint(args.log_dir)
    if latest is None:
        raise TrainError(no_checkpoint(args.log_dir))
    where = f"--resume: the checkpoint of step {latest} in {args.log_dir}"
    try:
        meta = backend.restore(args.log_dir, latest)
    except NanoMoeError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
        raise CheckpointError(f"{where} cannot be read ({type(e).__name__}); move it away to "
                              "resume from the one before") from None
    start_step = run_files.check_meta(meta, where, latest, args.max_steps)["step"]
    try:
        train_loader.load_state_dict(meta["data"])
    except DataError as e:  # name the checkpoint the position came from
        raise DataError(f"{where}: {e}") from None
    print(f"Resumed {args.log_dir} at step {start_step}", flush=True)
    return start_step


def no_checkpoint(log_dir: str) -> str:
    """--resume found no complete checkpoint: advise --overwrite only when what it would
    delete has been seen and holds no checkpoint at all (not one of another framework)."""
    if run_dir.has_checkpoint(log_dir):
        return (f"--resume: {log_dir} holds checkpoint files, but none that this --framework "
                "can resume (another framework's, or unfinished); resume with the run's "
                "--framework, or choose another --log_dir")
    return (f"--resume: no complete checkpoint in {log_dir} (the run stopped before its first "
            f"one); start it again with {run_dir.overwrite_advice(log_dir)}")


def start_log_dir(args, run_info: dict) -> None:
    """--overwrite removes the previous run's files; run.json records this one (the leader)."""
    if args.overwrite and not args.resume:
        removed = run_dir.clear_previous_run(args.log_dir)
        if removed:
            print(f"--overwrite: removed the previous run in {args.log_dir} "
                  f"({', '.join(removed)})", flush=True)
    atomic_write(os.path.join(args.log_dir, RUN_FILE), lambda tmp: _write_json(tmp, run_info))


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
