"""``python -m conversion <verb>``: to-torch, from-torch, to-hf, from-hf, compare.

Bad input ends with one sentence on stderr and exit code 2 (``--debug`` shows the traceback);
``compare`` exits 1 when the two models disagree beyond ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys

from nanomoe.errors import NanoMoeError
from nanomoe_jax.quiet import quiet_checkpoint_echoes

from .checkpoints import from_torch, to_torch
from .compare import DEFAULT_PROMPT, GREEDY_TOKENS, compare
from .hf import from_hf, to_hf

MODEL_TYPES = ("gpt", "moderngpt", "moegpt", "ngpt")


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = {"True": "true", "False": "false"}.get(value, value)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a string, e.g. route_score_func=sigmoid


def _tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids >= 0, e.g. 1,2,3; "
                                          f"got {text!r}")
    return ids


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", required=True, help="output path (written atomically)")
    out.add_argument("--force", action="store_true", help="replace --out if it exists")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", choices=MODEL_TYPES,
                       help="refuse a checkpoint of another model type")
    ckpt_help = ("a JAX checkpoint (a run's log folder = its newest step, a checkpoints folder "
                 "or a step folder), a .pt file or a to-torch --format safetensors folder")

    p = argparse.ArgumentParser(prog="python -m conversion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("to-torch", parents=[common, out, model],
                       help="checkpoint -> the original's .pt (or safetensors folder)")
    s.add_argument("ckpt", help=ckpt_help)
    s.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                   help="pt: {'model', 'config', 'step'} for torch.load(weights_only=True); "
                        "safetensors: a folder for nanomoe_torch.<Model>.from_pretrained")
    s.set_defaults(run=lambda a: to_torch(a.ckpt, a.out, a.format, a.force, model=a.model))

    s = sub.add_parser("from-torch", parents=[common, out, model],
                       help="the original's (or our) .pt -> JAX checkpoint")
    s.add_argument("pt", help="a .pt file: {'model', 'config', 'step'} or a bare state_dict")
    s.add_argument("--set", dest="overrides", type=_setting, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="config field to set or override (e.g. n_head=12 when the file has no "
                        "config, double_attn_scale=false); repeatable")
    s.set_defaults(run=lambda a: from_torch(a.pt, a.out, a.model, dict(a.overrides), a.force))

    s = sub.add_parser("to-hf", parents=[common, out, model],
                       help="checkpoint -> Hugging Face folder (GPT-2 / Llama; MoeGPT and nGPT: "
                            "remote code)")
    s.add_argument("ckpt", help=ckpt_help)
    s.set_defaults(run=lambda a: to_hf(a.ckpt, a.out, a.force, a.model))

    s = sub.add_parser("from-hf", parents=[common, out],
                       help="Hugging Face GPT-2 weights -> JAX checkpoint of our GPT")
    s.add_argument("name_or_dir", help="a local GPT-2 folder, or a hub name (gpt2, ...) when "
                                       "the hub is reachable")
    s.set_defaults(run=lambda a: from_hf(a.name_or_dir, a.out, a.force))

    s = sub.add_parser("compare", parents=[common],
                       help="run two models on the same tokens and compare their logits")
    s.add_argument("a", help="checkpoint, .pt, our safetensors folder or a HF folder")
    s.add_argument("b", help="the same kinds as A")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--prompt", help=f"text (byte tokenizer for vocab <= 512, else gpt2); "
                                    f"default {DEFAULT_PROMPT!r}")
    g.add_argument("--tokens", type=_tokens, help="explicit ids, e.g. 1,2,3")
    s.add_argument("--tolerance", type=_tolerance, default=1e-4,
                   help="largest accepted max|A-B| / max|logit|")
    s.add_argument("--generate", type=_count, metavar="N",
                   help=f"also decode N tokens greedily with each side's sampler; they must be "
                        f"equal (default {GREEDY_TOKENS} when a side is a remote-code export "
                        "from to-hf, else 0)")
    s.set_defaults(run=lambda a: 0 if compare(a.a, a.b, a.tokens, a.prompt, a.tolerance,
                                              generate=a.generate)["ok"] else 1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    quiet_checkpoint_echoes()  # process-wide, so here: a failed write is one sentence
    if args.verb in ("to-hf", "from-hf", "compare"):
        try:  # transformers is optional: the verbs that need it say so themselves
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keep the output to what the verbs print
        except ImportError:
            pass
    try:
        result = args.run(args)
    except (NanoMoeError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
