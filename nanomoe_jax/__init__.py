"""Flax NNX implementations of GPT, ModernGPT and MoeGPT, numerically matching the original."""

from flax import nnx

from nanomoe.config import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.init import init_params

from .gpt import GPT
from .layers import Options, default_dtype
from .execution import execution_options
from .modern_gpt import ModernGPT
from .moe_gpt import MoeGPT
from .ngpt import nGPT
from .weights import load_arrays

MODELS = {"gpt": GPT, "moderngpt": ModernGPT, "moegpt": MoeGPT, "ngpt": nGPT}


def model_class(config):
    """The Flax model class for a config instance."""
    for cls in MODELS.values():
        if isinstance(config, cls.config_class):
            return cls
    raise TypeError(f"not a model config: {type(config).__name__}")


def create_model(config, seed: int | None = None, **options):
    """The model for ``config`` holding the framework-free NumPy init of ``seed``: the same
    weights ``nanomoe_torch.create_model(config, seed)`` holds. ``seed`` defaults to
    ``config.seed`` where the config has one (MoeGPT), else 1337. ``options``: see Options."""
    seed = getattr(config, "seed", 1337) if seed is None else seed
    model = model_class(config)(config, rngs=nnx.Rngs(seed), **options)
    return load_arrays(model, init_params(config, seed))


__all__ = ["GPT", "ModernGPT", "MoeGPT", "nGPT", "GPTConfig", "ModernGPTConfig",
           "MoeGPTConfig", "nGPTConfig",
           "MODELS", "Options", "default_dtype", "execution_options", "model_class", "create_model"]
