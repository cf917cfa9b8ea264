"""What the server of `tests/cli_process.py` imports once, so that every command it forks has it:
all of moedsl, torch, transformers, safetensors, and the model classes of the tests' tiny models."""

import importlib
import pkgutil

import moedsl
import moedsl.cli  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

for _mod in pkgutil.walk_packages(moedsl.__path__, "moedsl."):
    if _mod.name.endswith("__main__"):
        continue  # run per command, as `python -m moedsl` does
    try:
        importlib.import_module(_mod.name)
    except ImportError:  # optional parts (triton, CUDA-only code): the command imports them, or not, itself
        pass

for _family in ("qwen3_moe", "mixtral"):
    importlib.import_module(f"transformers.models.{_family}.modeling_{_family}")
