"""The config of a .pt checkpoint: ours (a dict with ``model_type``), the original's (a pickled
dataclass or a plain dict), or none (inferred from the weights' shapes); pt_source.py reads
the weights beside it."""

from __future__ import annotations

from typing import Any, Callable

from .config import MODEL_CONFIGS, ModernGPTConfig, config_from_dict
from .errors import ConfigError, ConversionError


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
                   overrides: dict | None = None, log: Callable[[str], None] = print):
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
