"""Framework-free core shared by nanomoe_jax and nanomoe_torch (NumPy only)."""

from .config import (
    MODEL_CONFIGS,
    GPTConfig,
    ModelConfig,
    ModernGPTConfig,
    MoeGPTConfig,
    config_from_dict,
    nGPTConfig,
    config_to_dict,
    model_type_of,
)
from .errors import ConfigError, ConversionError, NanoMoeError
from .init import count_params, init_params, param_specs
from .state_dict import strip_wrapper_prefixes

__all__ = [
    "MODEL_CONFIGS",
    "GPTConfig",
    "ModelConfig",
    "ModernGPTConfig",
    "MoeGPTConfig",
    "nGPTConfig",
    "config_from_dict",
    "config_to_dict",
    "model_type_of",
    "ConfigError",
    "ConversionError",
    "NanoMoeError",
    "count_params",
    "init_params",
    "param_specs",
    "strip_wrapper_prefixes",
]
