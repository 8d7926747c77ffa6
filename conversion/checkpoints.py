"""Checkpoint files and folders: the original's .pt files (and ours), JAX checkpoints, our
safetensors folders; the ``to-torch`` / ``from-torch`` verbs; outputs written atomically.

Every verb works on one neutral form, a :class:`Source`: a config and NumPy arrays under the
original's state_dict keys (``nanomoe.init.param_specs`` order, tied head included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from nanomoe.config import MODEL_CONFIGS, ModernGPTConfig, config_from_dict, config_to_dict
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.init import param_specs, tied_names
from nanomoe.state_dict import strip_wrapper_prefixes

from .outputs import atomic_output, check_output
from .pt_files import load_checkpoint_file, load_state_dict_file, read_config_json

__all__ = ["atomic_output", "check_output", "load_checkpoint_file", "load_state_dict_file",
           "load_source", "init_arrays", "to_torch", "from_torch", "Source"]

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# configs of .pt files: ours, the original's, or none


def model_type_from_keys(keys) -> str | None:
    keys = set(keys)
    if "transformer.wte.weight" in keys:
        return "gpt"
    if any(k.startswith("blocks.") and k.endswith(".sqk") for k in keys):
        return "ngpt"
    if any(k.startswith("blocks.") for k in keys):
        return "moegpt"
    if any(k.startswith("h.") for k in keys):
        return "moderngpt"
    return None


def _n_layer(sd: dict, template: str) -> int:
    n = 0
    while template.format(n) in sd:
        n += 1
    return n


def infer_fields(sd: dict, model_type: str, n_head: int) -> dict[str, Any]:
    """Config fields the weights' shapes determine (``n_head`` only where they need it)."""
    shape = lambda k: tuple(sd[k].shape)  # noqa: E731
    if model_type == "gpt":
        V, C = shape("transformer.wte.weight")
        return dict(vocab_size=V, n_embd=C, block_size=shape("transformer.wpe.weight")[0],
                    n_layer=_n_layer(sd, "transformer.h.{}.ln_1.weight"))
    emb = "wte.weight"
    V, C = shape(emb)
    if model_type == "ngpt":  # n_head: sqk has C entries whatever the head count
        return dict(vocab_size=V, n_embd=C, n_layer=_n_layer(sd, "blocks.{}.rms_att.weight"))
    if model_type == "moegpt":
        E, H, _ = shape("blocks.0.mlp.impl.fc_weight")
        width = dict(ffn_factor=H // C) if H % C == 0 else dict(expert_dim=H)
        return dict(vocab_size=V, n_embd=C, n_layer=_n_layer(sd, "blocks.{}.ln1.weight"),
                    n_head=C // shape("blocks.0.attn.q_norm.weight")[0],
                    use_bias="blocks.0.attn.c_qkv.bias" in sd, n_experts=E, **width)
    gated = "h.0.mlp.gate_proj.weight" in sd
    H = shape("h.0.mlp.down_proj.weight" if gated else "h.0.mlp.c_proj.weight")[1]
    hd = C // n_head
    return dict(vocab_size=V, n_embd=C, n_layer=_n_layer(sd, "h.{}.ln1.weight"),
                use_bias="h.0.attn.c_qkv.bias" in sd, use_gate_proj=gated, ffn_factor=H // C,
                n_kv_head=(shape("h.0.attn.c_qkv.weight")[0] - C) // (2 * hd))


def resolve_config(raw: Any, sd: dict, path: str, model: str | None = None,
                   overrides: dict | None = None, log: Log = print):
    """The config of a .pt checkpoint whose ``'config'`` entry is ``raw``.

    Ours is a plain dict carrying ``model_type`` (``config_to_dict``); anything else — the
    original's pickled dataclass, a dict without ``model_type``, no config — is the original's.
    ``double_attn_scale`` is ours: where the config lacks it, the checkpoint was trained by the
    original, whose ModernGPT applies 1/sqrt(hd) twice, so it is imported as True.
    """
    overrides = dict(overrides or {})
    keys_type = model_type_from_keys(sd)
    if raw is None:
        fields, what = {}, "no config"
    elif isinstance(raw, dict):
        fields = dict(raw)
        what = "a plain-dict config" + (" with model_type (written by nanomoe)"
                                        if "model_type" in raw else " (the original's)")
    elif hasattr(raw, "__dict__"):
        fields, what = dict(vars(raw)), f"a pickled {type(raw).__name__} (the original's)"
        class_type = {c.__name__.lower(): t for t, c in MODEL_CONFIGS.items()}
        fields.setdefault("model_type", class_type.get(type(raw).__name__.lower()))
    else:
        raise ConversionError(f"{path}: its 'config' is a {type(raw).__name__}, not a config")
    ours = isinstance(raw, dict) and "model_type" in raw
    model_type = fields.pop("model_type", None) or keys_type or model
    if not isinstance(model_type, str) or model_type not in MODEL_CONFIGS:
        if isinstance(raw, dict) and "model_type" in raw:
            raise ConversionError(f"{path}: its config's model_type is "
                                  f"{str(raw['model_type'])[:40]!r}, not one of "
                                  f"{sorted(MODEL_CONFIGS)}; pass --model")
        raise ConversionError(f"{path}: cannot tell the model type; pass --model")
    if keys_type and keys_type != model_type:
        raise ConversionError(f"{path}: its config says {model_type}, its weights are {keys_type}")
    if model and model != model_type:
        raise ConversionError(f"{path} holds a {model_type} checkpoint, not {model} as asked")
    known = {f for f in MODEL_CONFIGS[model_type].__dataclass_fields__}
    if not ours:  # the original's config may carry fields we do not model: say so, drop them
        dropped = sorted(set(fields) - known)
        if dropped:
            log(f"ignored config fields unknown to nanomoe: {', '.join(dropped)}")
        fields = {k: v for k, v in fields.items() if k in known}
        if fields.get("dropout", 0.0) != 0.0:  # training-only; ours supports 0.0 alone
            log(f"dropout={fields['dropout']} set to 0.0 (it does not change the weights)")
            fields["dropout"] = 0.0
    if raw is None:
        n_head = overrides.get("n_head", fields.get("n_head", 12))
        try:
            inferred = infer_fields(sd, model_type, n_head)
        except KeyError as e:
            raise ConversionError(f"{path}: not a {model_type} state_dict (no {e})") from None
        fields = {**inferred, **fields}
        log(f"{path} has no config: inferred {inferred} from the weights; the rest are "
            f"{model_type} defaults (fix them with --set KEY=VALUE)")
    stored = "double_attn_scale" in fields
    if model_type == "moderngpt" and not stored:
        fields["double_attn_scale"] = True
    try:
        config = config_from_dict({**fields, **overrides}, model_type)
    except ConfigError as e:
        raise ConversionError(f"{path}: its config does not work ({e})") from None
    note = f"{path}: {what}, model {model_type}"
    if isinstance(config, ModernGPTConfig):
        why = ("--set" if "double_attn_scale" in overrides else "as stored" if stored else
               "no such field, so the original's checkpoint, whose attention applies "
               "1/sqrt(head_dim) twice")
        note += f"; double_attn_scale={config.double_attn_scale} ({why})"
    log(note)
    return config, ours


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def check_arrays(config, arrays: dict, where: str) -> dict[str, np.ndarray]:
    """``arrays`` (the original's keys) checked against ``config``'s model, in its key order."""
    specs = param_specs(config)
    missing = [k for k in specs if k not in arrays]
    unexpected = [k for k in arrays if k not in specs]
    wrong = [f"{k} {tuple(arrays[k].shape)} != {specs[k].shape}" for k in specs
             if k in arrays and tuple(arrays[k].shape) != specs[k].shape]
    if missing or unexpected or wrong:
        first = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
                 + wrong)[0]
        raise ConversionError(f"{where}: weights do not fit {type(config).__name__} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, "
                              f"{len(wrong)} mis-shaped keys; first: {first})")
    lm_head, embedding = tied_names(config)
    if not np.array_equal(arrays[lm_head], arrays[embedding]):
        raise ConversionError(f"{where}: {lm_head} differs from {embedding}, but the model "
                              "ties them")
    check_finite(arrays, where)
    return {k: arrays[k] for k in specs}


def check_finite(arrays: dict, where: str) -> None:
    """Refuse NaN/inf weights here, where the file can be named, rather than let training
    report them later as a learning-rate problem."""
    for key, value in arrays.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
            raise ConversionError(f"{where}: the weights hold non-finite values (first: {key}); "
                                  "the file is damaged or its run diverged: use an earlier "
                                  "checkpoint")


# ---------------------------------------------------------------------------------------------
# any source -> config + arrays


@dataclass
class Source:
    config: Any
    arrays: dict[str, np.ndarray]  # the original's keys, fp32
    step: int = 0
    meta: dict = field(default_factory=dict)  # extra JAX-checkpoint meta (tokenizer, ...)


def is_pretrained_folder(path: str) -> bool:
    """A folder of ours with config.json naming one of our model types."""
    try:
        config = read_config_json(path) if os.path.isdir(path) else None
    except ConversionError:
        return False
    model_type = (config or {}).get("model_type")
    return isinstance(model_type, str) and model_type in MODEL_CONFIGS


def load_source(path: str, model: str | None = None, overrides: dict | None = None,
                log: Log = print) -> Source:
    """A JAX checkpoint (log folder / checkpoints folder / step folder), a .pt file, or a
    safetensors folder of ours, as a :class:`Source`."""
    if not os.path.exists(path):
        if os.path.lexists(path):
            raise ConversionError(f"{path}: a link to nothing (a broken symlink); give the "
                                  "checkpoint it should point to")
        raise ConversionError(f"{path}: no such file or folder")
    if not os.path.isdir(path):  # a .pt file; a FIFO or device is refused before opening
        ckpt = load_checkpoint_file(path)
        if not isinstance(ckpt, dict):
            raise ConversionError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
        has_model = isinstance(ckpt.get("model"), dict)
        sd = strip_wrapper_prefixes(ckpt["model"] if has_model else ckpt)
        config, ours = resolve_config(ckpt.get("config") if has_model else None, sd, path,
                                      model, overrides, log)
        arrays = check_arrays(config, {k: _numpy(v) for k, v in sd.items()}, path)
        meta = {} if ours or config.vocab_size <= 512 else {"tokenizer": "gpt2"}
        return Source(config, arrays, parse_step(ckpt.get("step"), path) if has_model else 0,
                      meta)
    config_json = read_config_json(path)  # not JSON: say so, not "no checkpoint"
    if config_json is not None and not isinstance(config_json.get("model_type", ""), str):
        raise ConversionError(f"{os.path.join(path, 'config.json')}: model_type must be a "
                              f"string such as \"moegpt\", got a "
                              f"{type(config_json['model_type']).__name__}; fix that field or "
                              "export the model again")
    if is_pretrained_folder(path):
        from nanomoe_torch.pretrained import read_pretrained, read_pretrained_metadata

        config, state = read_pretrained(path)
        step = parse_step(read_pretrained_metadata(path).get("step"), path)
        source = Source(config, check_arrays(config, {k: _numpy(v) for k, v in state.items()},
                                             path), step)
    else:
        from nanomoe_jax.checkpoint import load_model

        from .torch_jax import export_arrays

        loaded, meta = load_model(path)
        extra = {k: meta[k] for k in ("tokenizer",) if k in meta}
        source = Source(loaded.config, export_arrays(loaded), parse_step(meta.get("step"), path),
                        extra)
        check_finite(source.arrays, path)
    _check_model(source.config, model, path)
    if overrides:  # e.g. --set double_attn_scale=true on one of our checkpoints
        fields = {**config_to_dict(source.config), **overrides}
        try:
            source.config = config_from_dict(fields)
        except ConfigError as e:
            raise ConversionError(f"--set: {e}") from None
    return source


MAX_STEP = 2**63 - 1


def parse_step(value: Any, path: str) -> int:
    """A checkpoint's recorded step: a non-negative int (or a string of one, as safetensors
    metadata stores it); None is 0; anything else is one sentence."""
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
        return value
    shown = repr(value) if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ConversionError(f"{path}: its recorded step is {shown}, not a whole number "
                          f"from 0 to 2**63-1; the file is damaged or was not written by a "
                          "trainer")


def _check_model(config, model: str | None, path: str) -> None:
    from nanomoe.config import model_type_of

    if model and model_type_of(config) != model:
        raise ConversionError(f"{path} holds a {model_type_of(config)} checkpoint, "
                              f"not {model} as asked")


# ---------------------------------------------------------------------------------------------
# the verbs


def torch_payload(source: Source) -> dict[str, Any]:
    """The original's .pt contents; the tied head is one tensor, as torch.save of the model."""
    import torch

    lm_head, embedding = tied_names(source.config)
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in source.arrays.items()
          if k != lm_head}
    sd[lm_head] = sd[embedding]
    sd = {k: sd[k] for k in source.arrays}
    return {"model": sd, "config": config_to_dict(source.config), "step": source.step}


def to_torch(ckpt: str, out: str, format: str = "pt", force: bool = False,
             model: str | None = None, log: Log = print) -> str:
    """A checkpoint (JAX, .pt or ours) -> the original's .pt (``format='pt'``) or a folder with
    model.safetensors + config.json (``'safetensors'``, read by ``from_pretrained``)."""
    if format not in ("pt", "safetensors"):
        raise ConversionError(f"--format: must be pt or safetensors, got {format!r}")
    check_output(out, force, [ckpt], "pt" if format == "pt" else "folder")
    source = load_source(ckpt, model, log=log)
    import torch

    from nanomoe_torch.pretrained import write_pretrained

    with atomic_output(out, force) as staging:
        if format == "pt":
            torch.save(torch_payload(source), staging)
        else:
            write_pretrained(staging, source.config, source.arrays, {"step": source.step})
    log(f"wrote {out} ({type(source.config).__name__}, step {source.step}, {format})")
    return out


def from_torch(path: str, out: str, model: str | None = None, overrides: dict | None = None,
               force: bool = False, log: Log = print) -> str:
    """A .pt checkpoint (the original's or ours) -> a JAX checkpoint folder at ``out``."""
    check_output(out, force, [path], "jax")
    source = load_source(path, model, overrides, log)
    step_folder = save_jax(source, out, force, {"source": os.path.abspath(path)})
    log(f"wrote {step_folder} ({type(source.config).__name__}, step {source.step})")
    return out


def jax_model(config, arrays: dict, **options):
    """The Flax model of ``config`` holding ``arrays``; built abstractly first, since every
    parameter is then replaced (no init compute)."""
    from flax import nnx

    import nanomoe_jax

    from .torch_jax import load_arrays

    cls = nanomoe_jax.model_class(config)
    return load_arrays(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **options)), arrays)


def save_jax(source: Source, out: str, force: bool, meta: dict) -> str:
    from nanomoe_jax.checkpoint import save_model

    model = jax_model(source.config, source.arrays)
    with atomic_output(out, force) as staging:
        save_model(model, staging, source.step, {**source.meta, **meta})
    return os.path.join(out, "checkpoints", str(source.step))


def init_arrays(path: str) -> dict[str, np.ndarray]:
    """Weights for ``train.py --init_from PATH`` in the original's names: a JAX checkpoint, a
    .pt file (the original's or ours), one of our safetensors folders, or Hugging Face GPT-2
    (a local folder, or a hub name such as ``gpt2`` when the hub is reachable)."""
    if not os.path.exists(path) and os.path.lexists(path):
        raise ConversionError(f"--init_from {path}: a link to nothing")
    hf_folder = (os.path.isdir(path) and read_config_json(path) is not None
                 and not is_pretrained_folder(path))
    if os.path.exists(path) and not hf_folder:
        return load_source(path, log=lambda *_: None).arrays
    import tempfile

    from .hf import from_hf

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "imported")
        from_hf(path, out, log=lambda *_: None)
        return load_source(out, log=lambda *_: None).arrays
