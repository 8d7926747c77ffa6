"""The thin PyTorch reference: the original's modules, names and math, for parity tests."""

from nanomoe.config import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig

from .gpt import GPT
from .modern_gpt import ModernGPT
from .moe_gpt import MoeGPT
from .ngpt import nGPT
from .pretrained import load_arrays

MODELS = {"gpt": GPT, "moderngpt": ModernGPT, "moegpt": MoeGPT, "ngpt": nGPT}


def model_class(config):
    """The reference model class for a config instance."""
    for cls in MODELS.values():
        if isinstance(config, cls.config_class):
            return cls
    raise TypeError(f"not a model config: {type(config).__name__}")


def create_model(config, seed: int | None = None):
    """Build the model for ``config`` with the shared NumPy init (``--seed``)."""
    return model_class(config).from_seed(config, seed)


__all__ = ["GPT", "ModernGPT", "MoeGPT", "nGPT", "GPTConfig", "ModernGPTConfig",
           "MoeGPTConfig", "nGPTConfig",
           "MODELS", "model_class", "create_model", "load_arrays"]
