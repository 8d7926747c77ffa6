"""``python -m conversion compare``: any two models on the same tokens, their logits side by
side, and (where asked) greedy decoding by each side's own sampler, token for token."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanomoe.errors import ConversionError, NanoMoeError
from nanomoe.prompts import check_prompt
from nanomoe.pt_files import read_config_json
from nanomoe.pt_source import Log
from nanomoe.tokenizer import get_tokenizer
from nanomoe_jax.sample import generate as jax_generate

from .checkpoints import is_pretrained_folder, jax_model, load_source
from .hf_folder import verified_copy
from .remote_code import check_remote_code, remote_model_of

DEFAULT_PROMPT = "Hello, I'm a language model,"
GREEDY_TOKENS = 50  # compare's default for a remote-code export


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
    if os.path.isdir(path) and _hf_model_type(path) and not is_pretrained_folder(path):
        return _hf_runner(path)
    source = load_source(path, log=log)  # says how a .pt file's config was read
    if os.path.isfile(path) or is_pretrained_folder(path):
        return _torch_runner(path, source)
    return _jax_runner(path, source)


def _hf_runner(path: str) -> Runner:
    # torch and transformers are optional (the torch and hf extras): imported where used
    import torch
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


def _torch_runner(path: str, source) -> Runner:
    import torch  # optional (the torch extra), as nanomoe_torch, which needs it

    import nanomoe_torch
    from nanomoe_torch.sample import generate as torch_generate

    c = source.config
    tm = nanomoe_torch.model_class(c)(c).eval()
    nanomoe_torch.load_arrays(tm, source.arrays)

    def torch_logits(ids):
        with torch.no_grad():
            return tm(torch.tensor([ids]))[0][0].double().numpy()

    return Runner(f"{path} ({type(tm).__name__}, nanomoe_torch)", torch_logits,
                  c.vocab_size, c.block_size,
                  lambda ids, n: torch_generate(tm, ids, n, temperature=0))


def _jax_runner(path: str, source) -> Runner:
    c = source.config
    if hasattr(c, "moe_dispatch"):  # every expert on every token: the original's math
        c = dataclasses.replace(c, moe_dispatch="dense")
    jm = jax_model(c, source.arrays, dtype=jnp.float32)
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
