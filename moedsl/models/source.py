"""Where a model's structure comes from: a config.json, a model directory, or transformers' own
config for a model_type, shrunk. Used by `moedsl validate` and `moedsl plan` alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moedsl.errors import MoedslError
from moedsl.models import remote


def config_from_file(path: str | Path, trust_remote_code: bool = False) -> Any:
    """A transformers config from a config.json: `AutoConfig.for_model(model_type, **rest)`, or,
    for a family whose code lives beside the file (`auto_map`), that code's config class
    (only with `trust_remote_code`; see moedsl.models.remote).

    The file is read as transformers reads it (`PreTrainedConfig._dict_from_json_file`), so the
    non-finite floats it writes as `{"__float__": "Infinity"}` (Mamba hybrids' `time_step_limit`)
    come back as floats."""
    from transformers import AutoConfig, PretrainedConfig

    from moedsl.models.tiny import quiet_transformers

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
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
    rc = remote.policy(path, trust_remote_code, data, text)
    if rc is not None and rc.config_class_ref is not None:
        return remote.load_config(rc, data)
    model_type = data.pop("model_type")
    # how the weights are stored (FP8, MXFP4, ...) is not structure: with it, transformers would build
    # its own quantized modules in place of the Linears a definition binds to
    data.pop("quantization_config", None)
    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **data)
    except Exception as err:  # transformers' own validation (strict dataclass fields, ValueError, ...)
        raise MoedslError(f"{path}: not a valid `{model_type}` config: {err}") from None


def config_for(model_type: str | None, config: str | Path | None = None,
               model_dir: str | Path | None = None, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(config, where it came from): the config file, else the model directory's, else `model_type`'s shrunk."""
    if config is not None:
        return config_from_file(config, trust_remote_code), f"config {config}"
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise MoedslError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        return config_from_file(Path(model_dir) / "config.json", trust_remote_code), f"model directory {model_dir}"
    from moedsl.models.tiny import tiny_config

    assert model_type is not None
    return tiny_config(model_type), f"transformers' own `{model_type}` config, shrunk"


def build(config: Any, device: str = "meta", trust_remote_code: bool = False) -> Any:
    """The model of a config (meta: structure only), its construction errors turned into MoedslError.
    `trust_remote_code`: the model class may be the config directory's own (`auto_map`)."""
    from moedsl.models.tiny import build_model

    rc = code_of(config) if trust_remote_code else None
    try:
        with remote.running(rc, "building the model"):
            return build_model(config, device=device, trust_remote_code=trust_remote_code)
    except MoedslError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MoedslError(f"could not build the model from its config: {type(err).__name__}: {err}") from None


def code_of(config: Any) -> remote.RemoteCode | None:
    """The checked code files behind a config loaded from a directory with `auto_map`, or None."""
    root = getattr(config, "_name_or_path", "") or ""
    if not getattr(config, "auto_map", None) or not root or not (Path(root) / "config.json").is_file():
        return None
    return remote.policy(Path(root) / "config.json", True)
