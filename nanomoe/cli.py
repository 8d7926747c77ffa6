"""The command line shared by both frameworks: the original's flags, ours, and one flag per
model-config field. ``parse_args`` returns the namespace; ``build_config`` the model config."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

from .config import MODEL_CONFIGS, ModelConfig
from .config_checks import check_config
from .errors import ConfigError
from .loader import DATA_ORDERS

# The original overrides --max_lr per model unless given or --no_override_defaults.
MAX_LR_OVERRIDES = {"moderngpt": 1e-3, "moegpt": 8e-4, "ngpt": 1.5e-3}
DEFAULT_MAX_LR = 6e-4

# The original's sample prompt fits English web text; on the default corpus (Shakespeare's
# plays) the sample starts the way a speech does.
ORIGINAL_PROMPT = "Hello, I'm a language model,"
DEFAULT_CORPUS_PROMPT = "ROMEO:\n"

# No accelerator and no size flag: about 2 minutes on 2 cores to nanoGPT's quick-start loss
# on Shakespeare (val 1.93 at 400 steps; 2.20 at 200, a sample still in fragments; NOTES.md).
CPU_PRESET = dict(n_layer=4, n_embd=128, n_head=4, block_size=256, B=8, T=256,
                  total_batch_size=8 * 256 * 2, max_steps=400, warmup_steps=40,
                  eval_interval=200, eval_steps=4, ckpt_interval=200, sample_every=400,
                  sample_tokens=200)
# Not --max_steps: a shorter first run (--max_steps 20) keeps the small model, not 8x512.
SIZE_FLAGS = ("n_layer", "n_embd", "n_head", "n_kv_head", "block_size", "B", "T",
              "total_batch_size", "n_experts")


def _config_fields() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for cls in MODEL_CONFIGS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "seed":  # MoeGPTConfig.seed is --seed
                fields.setdefault(f.name, (f, hints[f.name]))
    return fields


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _eval_steps(text: str) -> int | str:
    """An integer or "all"; anything else is kept as given and refused by check_ranges in
    one sentence (argparse would print its whole usage first)."""
    try:
        return int(text)
    except ValueError:
        return text.strip().lower()


def _what_to_train_flags(g: argparse._ArgumentGroup) -> None:
    """Framework, model, data, tokenizer, starting weights."""
    g.add_argument("--framework", choices=["jax", "torch"], default="jax")
    g.add_argument("--model", "--model_type", dest="model", choices=sorted(MODEL_CONFIGS),
                   default="moegpt", help="model type (--model_type is the original's name)")
    g.add_argument("--data", default=None,
                   help="token shards (.npy folder, nanoGPT train.bin/val.bin, llm.c .bin) or "
                        ".txt file/folder; default: Shakespeare's plays, shipped with the "
                        "package, byte-tokenised (no download)")
    g.add_argument("--tokenizer", default=None,
                   help="byte | gpt2 | PATH/tokenizer.json; default: gpt2 for token shards, "
                        "byte for text and the default corpus")
    g.add_argument("--init_from", default=None,
                   help="start from weights: an original .pt checkpoint or one of ours")


def _original_recipe_flags(g: argparse._ArgumentGroup) -> None:
    """The original's flags with its defaults, and its AdamW's."""
    g.add_argument("--max_steps", type=int, default=100)
    g.add_argument("--warmup_steps", type=int, default=10)
    g.add_argument("--max_lr", type=float, default=None,
                   help=f"default {DEFAULT_MAX_LR}, or per model {MAX_LR_OVERRIDES}")
    g.add_argument("--min_lr", type=float, default=6e-5)
    g.add_argument("--total_batch_size", type=int, default=262144,
                   help="tokens per optimizer step, across all devices")
    g.add_argument("--B", type=int, default=16, help="micro-batch size per device")
    g.add_argument("--T", type=int, default=1024, help="sequence length")
    g.add_argument("--log_dir", default="log")
    g.add_argument("--run_name", default=None)
    g.add_argument("--do_hellaswag", action="store_true",
                   help="HellaSwag accuracy at each eval (needs --hellaswag_file offline)")
    g.add_argument("--no_override_defaults", action="store_true",
                   help="keep --max_lr at 6e-4 for every model")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95,
                   help="AdamW beta2 (nanoGPT's Shakespeare recipe uses 0.99)")
    g.add_argument("--weight_decay", type=float, default=0.1,
                   help="AdamW decoupled weight decay, on weights of ndim >= 2 only")
    g.add_argument("--embedding_lr_mult", type=float, default=1.0,
                   help="MoeGPT's embedding lr multiplier; the original asks for 2 but its loop "
                        "resets it, so 1.0 is what it really trains with")
    g.add_argument("--ngpt_normalize_weights", action="store_true",
                   help="nGPT only: after every optimizer step renormalise each weight vector "
                        "along the embedding axis to unit norm, as the nGPT paper (the "
                        "original's loop does not)")


def _run_flags(g: argparse._ArgumentGroup) -> None:
    """Ours: seed, dtype, evals, data order, checkpoints, resuming, NaN steps."""
    g.add_argument("--seed", type=int, default=1337, help="initial weights (same in both frameworks)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype; default bfloat16 on GPU, float32 on CPU")
    g.add_argument("--eval_interval", type=int, default=250)
    g.add_argument("--eval_steps", type=_eval_steps, default=20,
                   help="val batches per eval, or 'all': every window of the val split once")
    g.add_argument("--data_order", default="sequential",
                   help="sequential: the original's in-order B*T+1 windows; random: nanoGPT's "
                        "get_batch, every row a window at a random start (seeded by --seed)")
    g.add_argument("--ckpt_interval", type=int, default=5000)
    g.add_argument("--keep_checkpoints", type=int, default=3)
    g.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --log_dir")
    g.add_argument("--stop_at", type=int, default=None,
                   help="stop with a checkpoint once this many steps are done (for time-limited "
                        "jobs); --resume continues with the same schedule")
    g.add_argument("--skip_nonfinite", type=int, default=0,
                   help="skip up to N steps whose loss or gradient is NaN/inf (not applied, "
                        "counted in metrics) before stopping; 0 stops at the first")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --log_dir that holds another run")


def _output_flags(g: argparse._ArgumentGroup) -> None:
    """Ours: logging, samples, HellaSwag, tracebacks."""
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--sample_every", type=int, default=0,
                   help="print a sample every N steps and at the end (0: only at the end on CPU preset)")
    g.add_argument("--sample_prompt", default=None,
                   help=f"default: {DEFAULT_CORPUS_PROMPT!r} on the default corpus (Python "
                        f"source), else the original's {ORIGINAL_PROMPT!r}")
    g.add_argument("--sample_tokens", type=int, default=64)
    g.add_argument("--hellaswag_file", default=None,
                   help="HellaSwag validation jsonl; default: downloaded once to "
                        "~/.cache/nanomoe when reachable")
    g.add_argument("--hellaswag_limit", type=int, default=None,
                   help="score only the first N examples (all 10042 by default)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _jax_execution_flags(g: argparse._ArgumentGroup) -> None:
    """How the JAX step runs; None lets nanomoe_jax.execution_options decide for the device."""
    g.add_argument("--scan_layers", type=_bool, default=None,
                   help="true: one lax.scan over the layers (faster compile); default: unrolled "
                        "up to 12 layers, scanned beyond and on a mesh of several GPUs")
    g.add_argument("--remat", choices=["none", "full", "dots"], default=None)
    g.add_argument("--attention_impl", choices=["xla", "cudnn", "custom_vjp"], default=None,
                   help="default: cudnn flash attention on NVIDIA GPUs >= sm_80 in bf16, "
                        "custom_vjp (a backward written for few passes) on CPU, else xla")
    g.add_argument("--loss_chunk_tokens", type=int, default=None)
    g.add_argument("--row_groups", type=int, default=None,
                   help="compute each micro-batch's loss as this many independent row groups "
                        "(same numbers; default: 2 on CPU, where XLA then keeps both cores busy, "
                        "else 1)")
    g.add_argument("--compile_cache", default="off",
                   help="folder of compiled programs kept between runs (a second run with the "
                        "same model and shapes skips most compiling), e.g. ~/.cache/nanomoe/jax; "
                        "JAX_COMPILATION_CACHE_DIR works too")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=4 or data=2,expert=4 (axes data, fsdp, "
                        "expert; data takes the devices the others leave); default: every "
                        "device on data")


def _model_config_flags(g: argparse._ArgumentGroup) -> None:
    """One flag per model-config field, typed as the field."""
    for name, (field, hint) in _config_fields().items():
        kind = typing.get_origin(hint)
        if kind in (typing.Union, types.UnionType):  # "int | None": the non-None type
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
            kind = typing.get_origin(hint)
        if hint is bool:
            g.add_argument(f"--{name}", type=_bool, default=None)
        elif kind is typing.Literal:
            g.add_argument(f"--{name}", choices=list(typing.get_args(hint)), default=None)
        else:
            g.add_argument(f"--{name}", type=hint, default=None)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train GPT, ModernGPT, MoeGPT or nGPT in JAX or PyTorch (build-nano-moe's recipe).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _what_to_train_flags(p.add_argument_group("what to train"))
    _original_recipe_flags(p.add_argument_group("the original's recipe"))
    ours = p.add_argument_group("ours")
    _run_flags(ours)
    _output_flags(ours)
    _jax_execution_flags(p.add_argument_group("JAX execution"))
    _model_config_flags(
        p.add_argument_group("model config (any field of the chosen model's config)"))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    if args.max_lr is None:
        override = not args.no_override_defaults
        args.max_lr = MAX_LR_OVERRIDES.get(args.model, DEFAULT_MAX_LR) if override else DEFAULT_MAX_LR
    if args.sample_prompt is None:
        args.sample_prompt = DEFAULT_CORPUS_PROMPT if args.data is None else ORIGINAL_PROMPT
    return args


# (flag, lowest allowed value): counts and sizes that a zero or a negative value breaks.
AT_LEAST = (("max_steps", 1), ("warmup_steps", 0), ("total_batch_size", 1), ("B", 1), ("T", 1),
            ("eval_interval", 1), ("eval_steps", 1), ("ckpt_interval", 1),
            ("keep_checkpoints", 1), ("stop_at", 1), ("skip_nonfinite", 0),
            ("sample_every", 0), ("sample_tokens", 0), ("hellaswag_limit", 1),
            ("loss_chunk_tokens", 1), ("row_groups", 1), ("seed", 0))


SEED_MAX = 2**32 - 1


def check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, before anything is built or written."""
    _check_choices(args)
    if args.seed > SEED_MAX:  # both frameworks seed 32-bit generators
        raise ConfigError(f"--seed must be at most {SEED_MAX}, got {args.seed}")
    for name, low in AT_LEAST:
        value = getattr(args, name, None)
        if value is not None and value != "all" and value < low:
            hint = {"keep_checkpoints": " (the newest checkpoint is what --resume continues from)",
                    "eval_steps": " (or all, for the whole val split)"}.get(name, "")
            raise ConfigError(f"--{name} must be at least {low}, got {value}{hint}")
    for name in ("max_lr", "min_lr", "embedding_lr_mult", "weight_decay"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:  # 0 is a legal "evaluate only" run
            raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")
    for name in ("beta1", "beta2"):
        value = getattr(args, name)
        if not 0 <= value < 1:  # NaN fails too; 1 would never forget the first gradients
            raise ConfigError(f"--{name} must be in [0, 1), got {value}")
    if args.min_lr > args.max_lr:
        raise ConfigError(f"--min_lr {args.min_lr} is above --max_lr {args.max_lr}; the "
                          "schedule decays from max_lr to min_lr")


def _check_choices(args: argparse.Namespace) -> None:
    """The word-valued flags whose bad value argparse would bury under its usage text."""
    if args.data_order not in DATA_ORDERS:
        raise ConfigError(f"--data_order must be {' or '.join(DATA_ORDERS)}, got "
                          f"{args.data_order!r}")
    if isinstance(args.eval_steps, str) and args.eval_steps != "all":
        raise ConfigError(f"--eval_steps must be a whole number of at least 1 or all, got "
                          f"{args.eval_steps!r}")


def given_config_fields(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _config_fields()
            if getattr(args, name, None) is not None}


def apply_cpu_preset(args: argparse.Namespace, argv: list[str]) -> bool:
    """Shrink to CPU_PRESET when no size flag was given; True when it did."""
    flags = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    if flags & set(SIZE_FLAGS):
        return False
    for key, value in CPU_PRESET.items():
        if key == "eval_interval" and "eval_interval" in flags:
            continue
        if key in flags:
            continue
        setattr(args, key, value)
    return True


def build_config(args: argparse.Namespace, vocab_size: int | None) -> ModelConfig:
    """The model config from its defaults, ``vocab_size`` (from the tokenizer) and the flags."""
    cls = MODEL_CONFIGS[args.model]
    if getattr(args, "ngpt_normalize_weights", False) and args.model != "ngpt":
        raise ConfigError(f"--ngpt_normalize_weights: nGPT's weight normalisation needs "
                          f"--model ngpt, not {args.model}")
    known = {f.name for f in dataclasses.fields(cls)}
    given = given_config_fields(args)
    foreign = sorted(set(given) - known)
    if foreign:
        raise ConfigError(f"--{foreign[0]}: not a field of {cls.__name__} (the --model "
                          f"{args.model} config); its fields are {sorted(known)}")
    fields = {}
    if vocab_size is not None and "vocab_size" not in given:
        fields["vocab_size"] = vocab_size
    fields.update(given)
    if "seed" in known:
        fields["seed"] = args.seed
    config = cls(**fields)
    check_config(config)  # the sizes and scales this project can build, by flag name
    return config
