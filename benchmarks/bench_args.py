"""The command line of ``python -m benchmarks.bench``: its flags, in the order ``--help``
lists them, and the preset's sizes filled in for the ones not given."""

from __future__ import annotations

import argparse

from .configs import BACKENDS, FRAMEWORKS, MODELS, PRESETS
from .env import has_cuda

SET_FIELDS = ("n_layer", "n_embd", "n_head", "block_size", "vocab_size")


def _csv(kind, choices=None, none_ok=True):
    def parse(text: str):
        if none_ok and text.strip().lower() in ("", "none"):
            return ()
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if kind is int:
            items = tuple(int(t) for t in items)
        bad = [t for t in items if choices and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {choices}")
        return items
    return parse


def _what_to_time_flags(p) -> None:
    """Presets, models, frameworks and the MoE sweep."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes: 'original' (the original's defaults, B=16 T=1024), 'tiny', "
                        "'cpu-nanogpt' (nanoGPT's CPU quick start: GPT 4x128, B=12, T=64, "
                        "bytes) or 'cpu-default' (train.py's CPU preset: MoeGPT 4x128, B=8, "
                        "T=256); default: original on a GPU, tiny otherwise")
    p.add_argument("--models", type=_csv(str, MODELS), default=None,
                   help="comma list of models to time, or 'none' (default: the preset's; all "
                        "four for original and tiny)")
    p.add_argument("--frameworks", type=_csv(str, FRAMEWORKS), default=FRAMEWORKS,
                   help="comma list among jax, torch (eager), torch-compile (default: all)")
    p.add_argument("--experts", type=_csv(int), default=None,
                   help="routed-expert counts of the MoE sweep, or 'none' "
                        "(default: the preset's, 4..64 original, 4,8,16 tiny)")
    p.add_argument("--backends", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="JAX MoE dispatch back ends of the sweep (default: all three)")
    p.add_argument("--sweep-mode", choices=("fixed", "fine"), default="fixed",
                   help="fixed (default): k and expert width constant, so the active expert "
                        "parameters are too; fine: k*H constant, experts shrink as E grows")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the dense ceiling (E = k) of the sweep (default: on)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="capacity_factor of the capacity dispatch in the sweep (default: 1.25)")


def _step_flags(p) -> None:
    """Steps, rounds, batch shape, dtype, seed and size overrides."""
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (per round with --rounds; default: preset's)")
    p.add_argument("--rounds", type=int, default=None,
                   help="> 1: build the model cells once and time them in turn, this many "
                        "rounds, order reversed every other round; reports median and spread "
                        "(default: the preset's, 8 for cpu-*, else 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: preset's)")
    p.add_argument("--B", type=int, default=None, help="batch size (default: preset's)")
    p.add_argument("--T", type=int, default=None, help="sequence length (default: preset's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype of both frameworks (default: bfloat16 on a GPU, "
                        "float32 on CPU where bf16 is emulated)")
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=INT",
                   help="override a size field of every model of the preset (and of the HLO "
                        "check's tiny model), e.g. --set n_layer=1; repeatable")


def _jax_option_flags(p) -> None:
    """The JAX step's execution options; None: what execution_options picks, as train.py."""
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="one lax.scan over the layers or a Python loop (default: scan)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default=None,
                   help="rematerialisation policy per layer (default: execution_options')")
    p.add_argument("--attention-impl", choices=("xla", "cudnn", "custom_vjp"), default=None,
                   help="attention implementation (default: cudnn flash attention on NVIDIA "
                        "GPUs >= sm_80 in bf16, custom_vjp on CPU, xla elsewhere)")
    p.add_argument("--loss-chunk-tokens", type=int, default=None,
                   help="tokens per cross-entropy chunk (default: execution_options', 8192)")
    p.add_argument("--row-groups", type=int, default=None,
                   help="independent row groups per micro-batch (default: execution_options', "
                        "2 on CPU, else 1)")
    p.add_argument("--fast-compile", action="store_true",
                   help="skip XLA's LLVM optimisations (CPU smoke tests: faster compiles, "
                        "slower steps; never for real measurements)")


def _measurement_flags(p) -> None:
    """How the peak is measured and whether cells get their own process."""
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: 8192 for "
                        "original, 512 for tiny)")
    p.add_argument("--isolate", action="store_true",
                   help="run every cell in its own process: exact per-cell peak memory, and an "
                        "OOM cannot disturb later cells (costs an import per cell)")


def _hlo_flags(p) -> None:
    """The HLO growth check and the FLOP table."""
    p.add_argument("--hlo", action="store_true",
                   help="list HLO ops growing with E and XLA's FLOPs per back end and E")
    p.add_argument("--hlo-experts", type=_csv(int, none_ok=False), default=(13, 52),
                   help="the two routed-expert counts the HLO shapes are compared at (default: "
                        "13,52; E, E-S and the slot count must not equal another dimension of the "
                        "model: see 'collisions' in the report)")
    p.add_argument("--hlo-dispatches", type=_csv(str, BACKENDS), default=("capacity", "dense"),
                   help="back ends whose HLO is checked (default: capacity,dense)")
    p.add_argument("--cost-experts", type=_csv(int, none_ok=False), default=(4, 8, 16, 32, 64),
                   help="routed-expert counts of the FLOP table (default: 4,8,16,32,64)")
    p.add_argument("--cost-dispatches", type=_csv(str, BACKENDS), default=BACKENDS,
                   help="back ends of the FLOP table (default: all three)")


def _output_flags(p) -> None:
    """Listing, where results go, merging, and the --isolate child's cell."""
    p.add_argument("--list", action="store_true",
                   help="print the cells this command would time (sizes, FLOPs) and exit")
    p.add_argument("--out", default=None,
                   help="folder for .json/.md/.png (default: $NANOMOE_RESULTS or "
                        "~/.cache/nanomoe/results; --out benchmarks/results adds to the "
                        "committed results)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="write one report from earlier runs' JSON files and exit")
    p.add_argument("--_cell", help=argparse.SUPPRESS)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Training throughput (tokens/s, MFU, memory, compile time) of the JAX "
                    "models against the PyTorch reference, an MoE sweep over the routed-expert "
                    "count at fixed active compute, and an HLO/FLOPs check of the MoE step.",
    )
    _what_to_time_flags(p)
    _step_flags(p)
    _jax_option_flags(
        p.add_argument_group("JAX model options (the GPU optimisation plan varies these)"))
    _measurement_flags(p)
    _hlo_flags(p.add_argument_group("HLO and FLOPs check (always on the tiny model)"))
    _output_flags(p)
    return p


def _set_fields(p: argparse.ArgumentParser, overrides: list[str]) -> dict[str, int]:
    """--set FIELD=INT pairs as a dict; a malformed or unknown one exits through p.error."""
    try:
        shape = dict(kv.split("=", 1) for kv in overrides)
        shape = {k: int(v) for k, v in shape.items()}
    except ValueError:
        p.error(f"--set takes FIELD=INT, got {overrides}")
    bad = sorted(set(shape) - set(SET_FIELDS))
    if bad:
        p.error(f"--set: {bad} not among {', '.join(SET_FIELDS)}")
    return shape


def fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The preset (original on a GPU, else tiny) supplies every size not given; then the
    combinations that cannot run are refused."""
    gpu = has_cuda()
    args.preset = args.preset or ("original" if gpu else "tiny")
    args.shape = _set_fields(p, args.overrides)
    preset = PRESETS[args.preset]
    for name in ("steps", "warmup", "B", "T", "matmul_n", "models", "rounds"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.experts is None:
        args.experts = preset.experts
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if len(args.hlo_experts) != 2:
        p.error("--hlo-experts takes two counts")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.rounds > 1 and args.isolate:
        p.error("--rounds times the cells in one process: it cannot be combined with --isolate")
