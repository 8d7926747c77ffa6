"""The sampling command line both frameworks share (``python -m nanomoe_jax.sample``,
``python -m nanomoe_torch.sample``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from .errors import NanoMoeError
from .prompts import check_prompt
from .pt_files import reuse_loads
from .pt_source import read_pt
from .tokenizer import get_tokenizer


def _number(kind: type, low: float, what: str,
            high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` in [``low``, ``high``] (NaN, inf and junk refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


GREEDY_BELOW = 1e-6  # logits / temperature overflow to inf below this: greedy instead
MAX_SEED = 2**32 - 1  # what every framework's generator takes
# The text is printed once complete, so all of it is held (a Python int a token, and JAX's
# token buffer): ten million tokens is ~0.4 GB; 2**40 asked the device for 4 TiB.
MAX_NEW_TOKENS = 10_000_000


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run's --log_dir, a checkpoint folder, or a .pt file (model_final.pt)")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--max_new_tokens", default=100,
                   type=_number(int, 0, f"an integer from 0 to {MAX_NEW_TOKENS}",
                                MAX_NEW_TOKENS))
    p.add_argument("--top_k", type=_number(int, 1, "an integer >= 1"), default=50)
    p.add_argument("--temperature", type=_number(float, 0, "a finite number >= 0"),
                   default=1.0, help=f"0 (or below {GREEDY_BELOW:g}): greedy")
    p.add_argument("--num_samples", type=_number(int, 1, "an integer >= 1"), default=1)
    p.add_argument("--seed", type=_number(int, 0, "an integer >= 0"), default=0,
                   help=f"samples use seed, seed+1, ...; at most {MAX_SEED} in all")
    p.add_argument("--tokenizer", default=None,
                   help="byte | gpt2 | PATH/tokenizer.json; default: the run's, else byte for "
                        "vocabularies up to 512, gpt2 otherwise")
    p.add_argument("--debug", action="store_true")
    for action in p._actions:  # the formatter shows a default only beside a help text
        if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)r"
    return p


def pick_tokenizer(name: str | None, meta: dict, vocab_size: int):
    return get_tokenizer(name or meta.get("tokenizer") or ("byte" if vocab_size <= 512 else "gpt2"))


def main(prog: str, load: Callable, generate: Callable, argv: list[str] | None = None) -> int:
    """``load(path) -> (model, meta)``; ``generate(model, ids, args, seed) -> new ids``."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.seed + args.num_samples - 1 > MAX_SEED:
        parser.error(f"argument --seed: the samples' seeds (--seed + --num_samples - 1) must be "
                     f"at most {MAX_SEED}, got {args.seed + args.num_samples - 1}")
    if args.temperature < GREEDY_BELOW:
        args.temperature = 0.0
    try:
        check_prompt(args.prompt, "--prompt")  # before any model is loaded
        if args.tokenizer:  # a bad --tokenizer is named before the model is loaded
            get_tokenizer(args.tokenizer)
        model, meta = _load(load, args.checkpoint)
        tokenizer = pick_tokenizer(args.tokenizer, meta, model.config.vocab_size)
        prompt = list(tokenizer.encode(args.prompt))
        if not prompt:
            raise NanoMoeError(f"--prompt {args.prompt[:40]!r} gives no tokens with the "
                               f"tokenizer {tokenizer.name}: give other text or another "
                               "--tokenizer")
        if max(prompt) >= model.config.vocab_size:
            raise NanoMoeError(f"--prompt: the tokenizer gives id {max(prompt)}, but the model "
                               f"knows ids below {model.config.vocab_size}: pass --tokenizer "
                               "with the run's tokenizer")
        for i in range(args.num_samples):
            out = _out_of_memory_is_one_sentence(generate, model, prompt, args, args.seed + i)
            print(f"--- sample {i}\n{tokenizer.decode(prompt + out)}", flush=True)
    except (NanoMoeError, OSError) as e:  # OSError: an unreadable file
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _out_of_memory_is_one_sentence(generate: Callable, *args):
    """``generate(*args)``, with the device or host running out of memory (XLA's
    RESOURCE_EXHAUSTED, torch's OutOfMemoryError, MemoryError) as one sentence."""
    try:
        return generate(*args)
    except Exception as e:  # noqa: BLE001 - each framework has its own type for it
        if not (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)
                or type(e).__name__ == "OutOfMemoryError"):
            raise
        raise NanoMoeError("out of memory while sampling: use a smaller --max_new_tokens, "
                           "--num_samples or model") from None


def _load(load: Callable, path: str):
    """``load(path)``, after a .pt file has passed the checks ``python -m conversion`` makes
    (config fields, weights' names, shapes, dtypes and values), so that the sampler refuses
    what conversion refuses, in the same sentence; the file is read once."""
    if not os.path.exists(path) and os.path.lexists(path):
        raise NanoMoeError(f"--checkpoint {path}: a link to nothing (a broken symlink); give "
                           "the checkpoint it should point to")
    if os.path.isdir(path) or not os.path.exists(path):
        return load(path)
    with reuse_loads():
        read_pt(path, log=lambda *_: None)  # what python -m conversion checks in a .pt file
        return load(path)
