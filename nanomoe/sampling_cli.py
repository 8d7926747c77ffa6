"""The sampling command line both frameworks share (``python -m nanomoe_jax.sample``,
``python -m nanomoe_torch.sample``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import NanoMoeError
from .tokenizer import get_tokenizer


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run's --log_dir, a checkpoint folder, or a .pt file (model_final.pt)")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="byte | gpt2 | PATH/tokenizer.json; default: the run's, else byte for "
                        "vocabularies up to 512, gpt2 otherwise")
    p.add_argument("--debug", action="store_true")
    return p


def pick_tokenizer(name: str | None, meta: dict, vocab_size: int):
    return get_tokenizer(name or meta.get("tokenizer") or ("byte" if vocab_size <= 512 else "gpt2"))


def main(prog: str, load: Callable, generate: Callable, argv: list[str] | None = None) -> int:
    """``load(path) -> (model, meta)``; ``generate(model, ids, args, seed) -> new ids``."""
    args = make_parser(prog).parse_args(argv)
    try:
        model, meta = load(args.checkpoint)
        tokenizer = pick_tokenizer(args.tokenizer, meta, model.config.vocab_size)
        prompt = list(tokenizer.encode(args.prompt))
        if not prompt:
            raise NanoMoeError("--prompt is empty: give some text to continue")
        for i in range(args.num_samples):
            out = generate(model, prompt, args, args.seed + i)
            print(f"--- sample {i}\n{tokenizer.decode(prompt + out)}", flush=True)
    except NanoMoeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
