"""``python -m conversion <verb>``: to-torch, from-torch, to-hf, from-hf, compare.

Bad input ends with one sentence on stderr and exit code 2 (``--debug`` shows the traceback);
``compare`` exits 1 when the two models disagree beyond ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import numpy as np

from nanomoe.errors import ConversionError, NanoMoeError
from nanomoe.prompts import check_prompt

from .checkpoints import Log, from_torch, is_pretrained_folder, load_source, to_torch
from .hf import from_hf, to_hf
from .hf_folder import verified_copy
from .pt_files import read_config_json
from .remote_code import check_remote_code, remote_model_of

MODEL_TYPES = ("gpt", "moderngpt", "moegpt", "ngpt")
DEFAULT_PROMPT = "Hello, I'm a language model,"
GREEDY_TOKENS = 50  # compare's default for a remote-code export


# ---------------------------------------------------------------------------------------------
# compare: any two models, same tokens, logits side by side


class Runner:
    """A loaded model: ``logits(ids) -> (T, V) float64``, ``greedy(ids, n) -> n token ids``
    (its own greedy decoding: the JAX sampler, nanomoe_torch's, or transformers' generate)
    plus what it accepts."""

    def __init__(self, name: str, logits: Callable, vocab_size: int, block_size: int,
                 greedy: Callable, remote: bool = False):
        self.name, self.logits, self.greedy = name, logits, greedy
        self.vocab_size, self.block_size, self.remote = vocab_size, block_size, remote


def _hf_model_type(path: str) -> str | None:
    config = read_config_json(path) if os.path.isdir(path) else None  # refuses bad JSON
    model_type = (config or {}).get("model_type")
    return model_type if isinstance(model_type, str) else None


def load_runner(path: str, log: Log = print) -> Runner:
    """A JAX checkpoint (run in JAX), a .pt file or our safetensors folder (run in
    nanomoe_torch), or a Hugging Face folder (run in transformers); all in fp32."""
    import torch

    if os.path.isdir(path) and _hf_model_type(path) and not is_pretrained_folder(path):
        from transformers import AutoModelForCausalLM, GenerationConfig

        config_json = read_config_json(path)
        # Remote code runs on loading: only a folder whose code is byte-identical to what
        # to-hf writes now (checked first) is loaded with it, and transformers sees only a
        # verified copy holding config, code and weights (no custom_generate, adapters, ...)
        spec = remote_model_of(config_json)
        if spec is not None:
            check_remote_code(path, config_json)
        with verified_copy(path, spec) as copy:
            try:
                hf = AutoModelForCausalLM.from_pretrained(
                    copy, local_files_only=True, trust_remote_code=spec is not None
                ).float().eval()
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"{path}: transformers could not load it "
                                      f"({type(e).__name__})") from None
        remote = spec is not None
        cfg = hf.config
        block = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings

        def hf_logits(ids):
            with torch.no_grad():
                return hf(torch.tensor([ids])).logits[0].double().numpy()

        def hf_greedy(ids, n):
            # a fresh config, not the folder's: greedy, no early stop at an end-of-text
            # token, nothing a generation_config.json could add (a decoding mode on the hub)
            gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None,
                                  pad_token_id=hf.generation_config.pad_token_id)
            ids_t = torch.tensor([ids])
            with torch.no_grad():
                out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                  generation_config=gc)
            return out[0, len(ids):].tolist()

        return Runner(f"{path} ({type(hf).__name__}, transformers)", hf_logits, cfg.vocab_size,
                      block, hf_greedy, remote)
    source = load_source(path, log=log)  # says how a .pt file's config was read
    c = source.config
    if os.path.isfile(path) or is_pretrained_folder(path):
        import nanomoe_torch

        tm = nanomoe_torch.model_class(c)(c).eval()
        nanomoe_torch.load_arrays(tm, source.arrays)

        def torch_logits(ids):
            with torch.no_grad():
                return tm(torch.tensor([ids]))[0][0].double().numpy()

        from nanomoe_torch.sample import generate as torch_generate

        return Runner(f"{path} ({type(tm).__name__}, nanomoe_torch)", torch_logits,
                      c.vocab_size, c.block_size,
                      lambda ids, n: torch_generate(tm, ids, n, temperature=0))
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from .checkpoints import jax_model

    if hasattr(c, "moe_dispatch"):  # every expert on every token: the original's math
        c = dataclasses.replace(c, moe_dispatch="dense")
    jm = jax_model(c, source.arrays, dtype=jnp.float32)
    from nanomoe_jax.sample import generate as jax_generate

    forward = nnx.jit(lambda m, idx: m(idx)[0])
    return Runner(f"{path} ({type(jm).__name__}, JAX fp32)",
                  lambda ids: np.asarray(forward(jm, jnp.asarray([ids]))[0], np.float64),
                  c.vocab_size, c.block_size,
                  lambda ids, n: jax_generate(jm, ids, n, temperature=0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(a: str, b: str, tokens: list[int] | None = None, prompt: str | None = None,
            tolerance: float = 1e-4, log: Log = print, generate: int | None = None) -> dict:
    """Run A and B on the same tokens; ``{'max_abs', 'rel', 'kl', 'top1', 'greedy', 'ok'}``.

    ``generate`` greedy tokens (default 50 where a side is a remote-code export, else none)
    are decoded by each side's own sampler and must be equal token for token."""
    if prompt is not None:
        check_prompt(prompt, "--prompt")  # before either model is loaded
    ra, rb = load_runner(a, log), load_runner(b, log)
    if ra.vocab_size != rb.vocab_size:
        raise ConversionError(f"the vocabularies differ ({ra.vocab_size} vs {rb.vocab_size}): "
                              "these are not the same model")
    if tokens is None:
        from nanomoe.tokenizer import get_tokenizer

        try:
            tokenizer = get_tokenizer("byte" if ra.vocab_size <= 512 else "gpt2")
        except NanoMoeError:
            raise ConversionError("the gpt2 tokenizer is unavailable (tiktoken fetches its "
                                  "files once, with network access): pass --tokens 1,2,3 "
                                  "instead") from None
        tokens = list(tokenizer.encode(DEFAULT_PROMPT if prompt is None else prompt))
    block = min(ra.block_size, rb.block_size)
    if not tokens or len(tokens) > block:
        raise ConversionError(f"need 1 to {block} tokens (block_size), got {len(tokens)}")
    if min(tokens) < 0 or max(tokens) >= ra.vocab_size:
        raise ConversionError(f"token ids must lie in 0..{ra.vocab_size - 1}; pass --tokens "
                              "with ids the model knows")
    la, lb = ra.logits(tokens), rb.logits(tokens)
    max_abs = float(np.abs(la - lb).max())
    rel = max_abs / max(float(np.abs(la).max()), float(np.abs(lb).max()), 1e-30)
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = float((np.exp(pa) * (pa - pb)).sum(-1).mean())
    top1 = float((la.argmax(-1) == lb.argmax(-1)).mean())
    n = (GREEDY_TOKENS if ra.remote or rb.remote else 0) if generate is None else generate
    n = min(n, block - len(tokens))
    greedy = None
    if n > 0:
        ga, gb = ra.greedy(tokens, n), rb.greedy(tokens, n)
        greedy = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y),
                      None if len(ga) == len(gb) else min(len(ga), len(gb)))
    ok = rel <= tolerance and greedy is None
    log(f"A: {ra.name}\nB: {rb.name}\n{len(tokens)} tokens: {tokens[:12]}"
        f"{' ...' if len(tokens) > 12 else ''}\n"
        f"max |logit A - logit B| = {max_abs:.3e}, relative to max |logit| = {rel:.3e}\n"
        f"KL(A || B) = {kl:.3e} nats per position (fp64)\n"
        f"top-1 agreement = {top1:.1%}\n"
        + ("" if n <= 0 else f"greedy decoding of {n} tokens: " + (
            "identical\n" if greedy is None else f"differs from token {greedy} on "
            f"(A {ga[greedy:greedy + 5]}..., B {gb[greedy:greedy + 5]}...)\n"))
        + f"{'OK' if ok else 'MISMATCH'}: relative difference {rel:.3e} "
        f"{'<=' if rel <= tolerance else '>'} tolerance {tolerance:g}"
        + ("" if greedy is None else ", greedy tokens differ"))
    return dict(max_abs=max_abs, rel=rel, kl=kl, top1=top1, ok=ok,
                greedy=None if n <= 0 else greedy is None)


# ---------------------------------------------------------------------------------------------
# the command line


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
    if args.verb in ("to-hf", "from-hf", "compare"):
        try:
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
