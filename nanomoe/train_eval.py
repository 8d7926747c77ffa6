"""Evaluation, sampling and the end of a run, for nanomoe.train_loop: the val loss (and
HellaSwag), a sample of text, the final export."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from . import hellaswag, next_steps
from .config import ModelConfig
from .loader import eval_batches
from .metrics import MetricsLogger


@dataclass
class Run:
    """What the loop, evaluation and sampling share once the run is set up."""
    args: argparse.Namespace
    backend: Any
    config: ModelConfig
    tokenizer: Any  # None: token shards whose tokenizer is unavailable
    run_info: dict
    leader: bool  # process 0: prints, plots and writes
    logger: MetricsLogger
    val_loader: Any
    tokens_per_micro: int
    hellaswag_file: str | None


def evaluate(r: Run, step_done: int) -> None:
    args = r.args
    batches = eval_batches(r.val_loader, args.eval_steps)  # one batch in memory at a time
    record = {"step": step_done, **{f"val_{k}": v for k, v in r.backend.evaluate(batches).items()},
              "val_tokens": len(batches) * r.tokens_per_micro}
    line = (f"step {step_done:5d} | val loss {record['val_loss']:.4f} "
            f"({record['val_tokens']:,} tokens)")
    if r.hellaswag_file:
        scores = hellaswag.evaluate(r.backend.logits, r.hellaswag_file, r.tokenizer,
                                    max_len=r.config.block_size, limit=args.hellaswag_limit)
        record["hellaswag_acc"] = scores["acc_norm"]
        line += f" | hellaswag acc_norm {scores['acc_norm']:.4f} ({scores['n']} examples)"
    r.logger.log(record)
    if r.leader:
        print(line, flush=True)
        r.logger.plot()


def sample(r: Run, step_done: int) -> None:
    # every process samples (a multi-host JAX model is one program), the leader prints
    args, tokenizer = r.args, r.tokenizer
    prompt = [0] if tokenizer is None else list(tokenizer.encode(args.sample_prompt))
    out = r.backend.sample(prompt, args.sample_tokens, top_k=50, temperature=1.0, seed=args.seed)
    if not r.leader:
        return
    if tokenizer is None:  # token shards whose tokenizer is unavailable: show ids
        print(f"sample at step {step_done} (token ids): {out}", flush=True)
    else:
        print(f"sample at step {step_done}: {tokenizer.decode(prompt + out)!r}", flush=True)


def close_run(r: Run, summary: dict) -> dict:
    """The metrics closed, the last checkpoint written: the summary run() returns."""
    r.logger.close()
    r.backend.finish()
    summary.update(config=r.config, log_dir=r.args.log_dir, records=r.logger.records)
    return summary


def finish_run(r: Run, summary: dict, start_step: int) -> dict:
    """A run that reached --max_steps: evaluated, exported to model_final.pt, sampled."""
    args, backend = r.args, r.backend
    if args.max_steps > start_step:
        evaluate(r, args.max_steps)
    final = os.path.join(args.log_dir, "model_final.pt")
    backend.export_final(final, args.max_steps)  # every process takes part, rank 0 writes
    summary["model_final"] = final
    sample(r, args.max_steps)
    if r.leader:
        r.logger.plot()
    close_run(r, summary)
    if r.leader:
        print(next_steps.text(args, backend.name, r.run_info["tokenizer"]), flush=True)
    return summary
