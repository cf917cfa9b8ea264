"""Models moedsl can make without a hub: tiny models from transformers' configs, and the built-in default."""

from moedsl.models.default import build_byte_tokenizer, default_config, default_model_dir, save_byte_tokenizer
from moedsl.models.tiny import (
    DENSE_TINY,
    MOE_EXTRA_TINY,
    MOE_TINY,
    TINY_NOTES,
    SUPPORTED_TINY,
    UNSUPPORTED_TINY,
    available_tiny,
    build_model,
    save_tiny,
    tiny_config,
)

__all__ = [
    "DENSE_TINY",
    "MOE_EXTRA_TINY",
    "MOE_TINY",
    "TINY_NOTES",
    "SUPPORTED_TINY",
    "UNSUPPORTED_TINY",
    "available_tiny",
    "build_byte_tokenizer",
    "build_model",
    "default_config",
    "default_model_dir",
    "save_byte_tokenizer",
    "save_tiny",
    "tiny_config",
]
