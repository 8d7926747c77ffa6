"""Weights between the Flax models and the original's state_dict keys (names.py's tables).

``load_torch_weights(model, state_dict)`` fills a JAX model from the original's keys (torch
tensors or NumPy arrays; ``_orig_mod.``/``module.`` prefixes accepted);
``torch_state_dict(model)`` gives torch tensors under the original's keys that load strictly
into ``nanomoe_torch`` and into the original's own modules. Both go through NumPy arrays
(``load_arrays`` / ``export_arrays``), which is also how ``--seed`` init reaches JAX
(``create_model``). ``conversion`` exports these as its API.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanomoe.errors import ConversionError
from nanomoe.init import param_specs, tied_names
from nanomoe.state_dict import strip_wrapper_prefixes

from .names import Rule, rules, to_jax_layout, to_torch_layout


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): var for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


def load_arrays(model: nnx.Module, arrays: Mapping[str, Any]) -> nnx.Module:
    """Set every parameter of ``model`` from the original's keys; all-or-nothing.

    Raises :class:`ConversionError` listing every missing, unexpected and mis-shaped key
    before anything is written.
    """
    arrays = strip_wrapper_prefixes(arrays)
    config = model.config
    variables = _variables(model)
    lm_head, embedding = tied_names(config)
    missing, mis_shaped, unexpected = [], [], []
    updates: dict[str, np.ndarray] = {}
    used = {lm_head}
    for rule in rules(config):
        keys = rule.torch_keys(getattr(config, "n_layer"))
        absent = [k for k in keys if k not in arrays]
        used.update(k for k in keys if k in arrays)
        if absent:
            missing += absent
            continue
        parts = [_to_numpy(arrays[k]) for k in keys]
        var = variables[rule.jax_path]
        expected = _torch_shape(var.shape, rule)
        wrong = [f"{k}: expected {expected}, got {p.shape}" for k, p in zip(keys, parts)
                 if tuple(p.shape) != expected]
        if wrong:
            mis_shaped += wrong
            continue
        updates[rule.jax_path] = to_jax_layout(parts, rule)
    unexpected = sorted(set(arrays) - used)
    if lm_head in arrays and embedding in arrays and not mis_shaped:
        if not np.array_equal(_to_numpy(arrays[lm_head]), _to_numpy(arrays[embedding])):
            mis_shaped.append(f"{lm_head}: differs from {embedding}, but the model ties them")
    if missing or unexpected or mis_shaped:
        lines = [f"weights do not fit {type(model).__name__} "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(mis_shaped)} mis-shaped keys)"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mis-shaped: {k}" for k in mis_shaped]
        raise ConversionError("\n".join(lines))
    for path, value in updates.items():
        var = variables[path]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    return model


def _torch_shape(jax_shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
    shape = tuple(jax_shape[1:]) if rule.stacked else tuple(jax_shape)
    return shape[::-1] if rule.transpose else shape


def export_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as NumPy arrays under the original's keys (tied head included)."""
    config = model.config
    variables = _variables(model)
    out: dict[str, np.ndarray] = {}
    for rule in rules(config):
        value = np.asarray(variables[rule.jax_path].get_value())
        for key, part in zip(rule.torch_keys(getattr(config, "n_layer")),
                             to_torch_layout(value, rule, getattr(config, "n_layer"))):
            out[key] = part
    lm_head, embedding = tied_names(config)
    out[lm_head] = out[embedding]
    return {k: out[k] for k in param_specs(config)}  # the original's key order


def load_torch_weights(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Load an original (or ``nanomoe_torch``) state_dict into the JAX ``model``; returns it."""
    return load_arrays(model, state_dict)


def torch_state_dict(model: nnx.Module) -> dict[str, Any]:
    """torch tensors under the original's keys; ``lm_head.weight`` is ``wte``'s tensor."""
    import torch  # optional for JAX: only an export to the original's format needs it

    arrays = export_arrays(model)
    lm_head, embedding = tied_names(model.config)
    out = {k: torch.from_numpy(v.copy()) for k, v in arrays.items() if k != lm_head}
    out[lm_head] = out[embedding]
    return {k: out[k] for k in arrays}  # the original's key order
