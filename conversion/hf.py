"""Hugging Face transformers, with no custom code on their side:

* GPT -> ``GPT2LMHeadModel``: the same names (the original copied GPT-2's); HF's Conv1D stores
  ``c_attn``, both ``c_proj`` and ``c_fc`` as (in, out), so those are transposed.
* ModernGPT -> ``LlamaForCausalLM``: q/k rows permuted per head from interleaved RoPE pairs
  (2i, 2i+1) to Llama's half-split pairs (i, i + hd/2); ``c_fc``'s halves a, b (a * silu(b))
  become ``up_proj``, ``gate_proj``; the original's doubled 1/sqrt(hd) is folded into q.
* MoeGPT, nGPT: no stock class fits; remote code (``trust_remote_code=True``) generated from
  ``nanomoe_torch`` by ``remote_code.py``, written by ``remote_export.py``.
* GPT-2 weights (a folder, or a hub name when the hub is reachable) -> our GPT in JAX, as the
  original's ``GPT.from_pretrained`` does.

transformers, torch and huggingface_hub are optional (the hf extra): each is imported inside
the function that uses it, so ``import conversion`` works without them.
"""

from __future__ import annotations

import inspect
import math
import os

import numpy as np

from nanomoe.config import GPTConfig, ModernGPTConfig
from nanomoe.errors import ConversionError
from nanomoe.init import param_specs
from nanomoe.pt_source import Log, Source, check_arrays

from .checkpoints import load_source, save_jax
from .hf_folder import verified_copy
from .hf_tokenizer import write_tokenizer
from .outputs import atomic_output, check_output
from nanomoe.pt_files import read_config_json
from .remote_code import remote_model_of
from .remote_export import has_remote_export, write_remote_folder

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _eot(vocab_size: int) -> int | None:
    # GPT-2's <|endoftext|> where the vocab is GPT-2's; the byte tokenizer has none.
    return 50256 if vocab_size > 50256 else None


# ---------------------------------------------------------------------------------------------
# GPT <-> GPT2LMHeadModel


def gpt2_config(c: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                      n_layer=c.n_layer, n_head=c.n_head, n_inner=None,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=_eot(c.vocab_size),
                      eos_token_id=_eot(c.vocab_size), tie_word_embeddings=True,
                      architectures=["GPT2LMHeadModel"])


def gpt2_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ours -> GPT2LMHeadModel's (and back: the transpose is its own inverse)."""
    return {k: (v.T if k.endswith(CONV1D) else v) for k, v in arrays.items()}


def gpt2_unsupported(hf) -> list[str]:
    """The fields of a GPT2Config our GPT (the original's) cannot reproduce."""
    ok = {"activation_function": hf.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
          "n_inner": hf.n_inner in (None, 4 * hf.n_embd),
          "layer_norm_epsilon": hf.layer_norm_epsilon == 1e-5,
          "scale_attn_weights": hf.scale_attn_weights,
          "scale_attn_by_inverse_layer_idx": not hf.scale_attn_by_inverse_layer_idx,
          "add_cross_attention": not getattr(hf, "add_cross_attention", False),
          "tie_word_embeddings": getattr(hf, "tie_word_embeddings", True)}
    return [f"{k}={getattr(hf, k, None)!r}" for k, good in ok.items() if not good]


# ---------------------------------------------------------------------------------------------
# ModernGPT -> LlamaForCausalLM


def llama_config(c: ModernGPTConfig):
    """The LlamaConfig of ``c``; refuses (ConversionError) what it does not express."""
    from transformers import LlamaConfig

    hd = c.n_embd // c.n_head
    eot = _eot(c.vocab_size)
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd,
              intermediate_size=c.ffn_factor * c.n_embd, num_hidden_layers=c.n_layer,
              num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=hd,
              hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=1e-5,
              tie_word_embeddings=True, attention_bias=c.use_bias, mlp_bias=c.use_bias,
              attention_dropout=0.0, bos_token_id=eot, eos_token_id=eot,
              architectures=["LlamaForCausalLM"])
    # transformers 5 keeps the RoPE base in rope_parameters, 4.x in rope_theta
    fields = {**getattr(LlamaConfig, "__annotations__", {}),
              **inspect.signature(LlamaConfig.__init__).parameters}
    if "rope_parameters" in fields:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(c.rope_scaling)}
    else:
        kw["rope_theta"] = float(c.rope_scaling)
    hf = LlamaConfig(**kw)
    check_llama(c, hf)
    return hf


def check_llama(c: ModernGPTConfig, hf) -> None:
    """Refuse unless the built LlamaConfig kept every value the model needs (an older
    transformers silently drops fields it lacks, e.g. ``mlp_bias`` before 4.41)."""
    import transformers

    rope = getattr(hf, "rope_parameters", None) or {}
    want = dict(hidden_size=c.n_embd, intermediate_size=c.ffn_factor * c.n_embd,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                head_dim=c.n_embd // c.n_head, attention_bias=c.use_bias, mlp_bias=c.use_bias,
                rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    have = {k: getattr(hf, k, None) for k in want}
    have["rope_theta"] = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    have["rope_type"] = rope.get("rope_type", "default")
    want.update(rope_theta=float(c.rope_scaling), rope_type="default")
    bad = [f"{k}={want[k]!r}" for k in want if have[k] != want[k]]
    if bad:
        raise ConversionError(f"transformers {transformers.__version__}'s LlamaConfig cannot "
                              f"express this ModernGPT (it does not keep {', '.join(bad)}); "
                              "upgrade transformers or export with to-torch instead")


def rope_half_split_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows (out features) from interleaved pairs (2i, 2i+1) to the
    half-split pairs (i, i + hd/2) that Llama's rotate_half rotates together; the same
    order on q and k leaves every q.k unchanged."""
    hd = w.shape[0] // n_heads
    order = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    return w.reshape(n_heads, hd, *w.shape[1:])[:, order].reshape(w.shape)


def llama_state_dict(arrays: dict[str, np.ndarray], c: ModernGPTConfig) -> dict[str, np.ndarray]:
    nh, nkv, hd, H = c.n_head, c.n_kv_head, c.n_embd // c.n_head, c.ffn_factor * c.n_embd
    # The original's attention logits are q.k/hd: one 1/sqrt(hd) goes into q, Llama adds the other.
    q_scale = np.float32(1 / math.sqrt(hd) if c.double_attn_scale else 1.0)
    out = {"model.embed_tokens.weight": arrays["wte.weight"],
           "model.norm.weight": arrays["ln_f.weight"], "lm_head.weight": arrays["lm_head.weight"]}
    for i in range(c.n_layer):
        p, L = f"h.{i}", f"model.layers.{i}"
        out[f"{L}.input_layernorm.weight"] = arrays[f"{p}.ln1.weight"]
        out[f"{L}.post_attention_layernorm.weight"] = arrays[f"{p}.ln2.weight"]
        for leaf in ("weight", "bias") if c.use_bias else ("weight",):
            q, k, v = np.split(arrays[f"{p}.attn.c_qkv.{leaf}"], [nh * hd, (nh + nkv) * hd])
            out[f"{L}.self_attn.q_proj.{leaf}"] = rope_half_split_rows(q, nh) * q_scale
            out[f"{L}.self_attn.k_proj.{leaf}"] = rope_half_split_rows(k, nkv)
            out[f"{L}.self_attn.v_proj.{leaf}"] = v
            out[f"{L}.self_attn.o_proj.{leaf}"] = arrays[f"{p}.attn.out_proj.{leaf}"]
            if c.use_gate_proj:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{L}.mlp.{name}.{leaf}"] = arrays[f"{p}.mlp.{name}.{leaf}"]
            else:  # c_proj(a * silu(b)), a = first H rows of c_fc: a is "up", b is "gate"
                a, b = np.split(arrays[f"{p}.mlp.c_fc.{leaf}"], [H])
                out[f"{L}.mlp.up_proj.{leaf}"], out[f"{L}.mlp.gate_proj.{leaf}"] = a, b
                out[f"{L}.mlp.down_proj.{leaf}"] = arrays[f"{p}.mlp.c_proj.{leaf}"]
    return out


# ---------------------------------------------------------------------------------------------
# the verbs


def to_hf(ckpt: str, out: str, force: bool = False, model: str | None = None,
          log: Log = print) -> str:
    """A checkpoint (JAX, .pt or ours) -> a folder ``AutoModelForCausalLM.from_pretrained``
    loads (GPT, ModernGPT; MoeGPT and nGPT with ``trust_remote_code=True``)."""
    import torch  # torch and transformers are optional (the hf extra): imported where used

    check_output(out, force, [ckpt], "folder")
    source = load_source(ckpt, model, log=log)
    c = source.config
    if has_remote_export(c):  # MoeGPT, nGPT: their own code beside the weights (remote code)
        with atomic_output(out, force) as staging:
            tokenizer = write_remote_folder(staging, source, log)
        log(f"wrote {out}: {type(c).__name__[:-6]} with its modeling code and {tokenizer}; "
            f"load it with transformers.AutoModelForCausalLM.from_pretrained({out!r}, "
            "trust_remote_code=True) (that runs the folder's modeling_*.py)")
        return out
    if isinstance(c, GPTConfig):
        from transformers import GPT2LMHeadModel

        hf_model, state = GPT2LMHeadModel(gpt2_config(c)), gpt2_state_dict(source.arrays)
    else:
        from transformers import LlamaForCausalLM

        hf_model, state = LlamaForCausalLM(llama_config(c)), llama_state_dict(source.arrays, c)
    hf_model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in
                              state.items()}, strict=True)
    with atomic_output(out, force) as staging:
        hf_model.save_pretrained(staging)
        tokenizer = write_tokenizer(staging, source.meta.get("tokenizer"), c.vocab_size,
                                    c.block_size)
    log(f"wrote {out}: {type(hf_model).__name__} for transformers.AutoModelForCausalLM"
        f".from_pretrained({out!r}) (weights, config and {tokenizer})")
    return out


def _download(name: str) -> str:
    """A hub model's config.json and safetensors weights (nothing else: no code, no pickles)
    in the hub's cache; the folder they are in."""
    from huggingface_hub import snapshot_download  # optional, as transformers

    try:
        return snapshot_download(name, allow_patterns=list(HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad name: one message
        raise ConversionError(f"could not get {name!r} ({type(e).__name__}): it is not a "
                              "local folder and the Hugging Face hub did not provide it; "
                              "pass a folder holding config.json and the weights") from None


HUB_FILES = ("config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json")


def from_hf(name_or_dir: str, out: str, force: bool = False, log: Log = print) -> str:
    """Hugging Face GPT-2 weights (a local folder, or a hub name when the hub is reachable)
    -> a JAX checkpoint of our GPT (vocab and block_size from the GPT-2 config).

    transformers reads only a verified copy of the folder (see hf_folder.py): nothing in the
    folder can run code."""
    check_output(out, force, [name_or_dir], "jax")
    local = os.path.lexists(name_or_dir)
    folder = name_or_dir if local else _download(name_or_dir)
    config_json = read_config_json(folder)  # also: config.json that is not JSON
    if config_json is None:
        raise ConversionError(f"{name_or_dir}: not a Hugging Face model folder (no config.json)")
    if remote_model_of(config_json):  # one of our remote-code exports: say what it is
        raise ConversionError(f"{name_or_dir} holds a {config_json['model_type']!r} model; "
                              "from-hf imports GPT-2 (GPT2LMHeadModel) weights only")
    with verified_copy(folder) as copy:
        hf_config, hf_model = _load_gpt2(copy, name_or_dir)
    c = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                  n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    arrays = gpt2_state_dict({k: state[k] for k in param_specs(c) if k in state})
    source = Source(c, check_arrays(c, arrays, name_or_dir), 0,
                    {"tokenizer": "gpt2"} if _eot(c.vocab_size) else {})
    step_folder = save_jax(source, out, force, {"source": name_or_dir})
    log(f"wrote {step_folder}: GPT {c}")
    return out


def _load_gpt2(copy: str, name: str):
    """(GPT2Config, GPT2LMHeadModel) from the verified ``copy`` of ``name``; never remote
    code, never a hub kernel (eager attention: only the weights are taken)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    try:
        hf_config = AutoConfig.from_pretrained(copy, local_files_only=True,
                                               trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a config transformers rejects: one message
        detail = (str(e).splitlines() or [""])[0][:160].replace(copy, name)
        raise ConversionError(f"{name}/config.json: transformers could not read it "
                              f"({type(e).__name__}: {detail})") from None
    if hf_config.model_type != "gpt2":
        raise ConversionError(f"{name} holds a {hf_config.model_type!r} model; from-hf "
                              "imports GPT-2 (GPT2LMHeadModel) weights only")
    bad = gpt2_unsupported(hf_config)
    if bad:
        raise ConversionError(f"{name}: our GPT cannot express this GPT-2 config "
                              f"({', '.join(bad)})")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(copy, local_files_only=True,
                                                   trust_remote_code=False,
                                                   attn_implementation="eager")
    except Exception as e:  # noqa: BLE001
        detail = (str(e).splitlines() or [""])[0][:200].replace(copy, name)
        raise ConversionError(f"could not load the weights of {name!r} "
                              f"({type(e).__name__}: {detail})") from None
    return hf_config, hf_model
