"""Where a model's structure comes from: a config.json, a model directory, or transformers' own
config for a model_type, shrunk. Used by `moedsl validate` and `moedsl plan` alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moedsl.errors import MoedslError


def config_from_file(path: str | Path) -> Any:
    """A transformers config from a config.json: `AutoConfig.for_model(model_type, **rest)`.

    The file is read as transformers reads it (`PreTrainedConfig._dict_from_json_file`), so the
    non-finite floats it writes as `{"__float__": "Infinity"}` (Mamba hybrids' `time_step_limit`)
    come back as floats."""
    from transformers import AutoConfig, PretrainedConfig

    from moedsl.models.tiny import quiet_transformers

    path = Path(path)
    try:
        data = PretrainedConfig._dict_from_json_file(path)
    except FileNotFoundError:
        raise MoedslError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MoedslError(f"{path}: is a directory, not a config.json (use --model DIR)") from None
    except json.JSONDecodeError as err:
        raise MoedslError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise MoedslError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise MoedslError(f"{path}: a config.json needs a `model_type`")
    model_type = data.pop("model_type")
    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **data)
    except Exception as err:  # transformers' own validation (strict dataclass fields, ValueError, ...)
        raise MoedslError(f"{path}: not a valid `{model_type}` config: {err}") from None


def config_for(model_type: str | None, config: str | Path | None = None,
               model_dir: str | Path | None = None) -> tuple[Any, str]:
    """(config, where it came from): the config file, else the model directory's, else `model_type`'s shrunk."""
    if config is not None:
        return config_from_file(config), f"config {config}"
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise MoedslError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        return config_from_file(Path(model_dir) / "config.json"), f"model directory {model_dir}"
    from moedsl.models.tiny import tiny_config

    assert model_type is not None
    return tiny_config(model_type), f"transformers' own `{model_type}` config, shrunk"


def build(config: Any, device: str = "meta") -> Any:
    """The model of a config (meta: structure only), its construction errors turned into MoedslError."""
    from moedsl.models.tiny import build_model

    try:
        return build_model(config, device=device)
    except MoedslError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MoedslError(f"could not build the model from its config: {type(err).__name__}: {err}") from None
