"""`moedsl plan FILE [--config FILE | --model DIR] [--policy P] [--tokens N] [--json]`.

The definition is a `.moedef` file or a library name. The model structure is built on the
meta device (no weights) from `--config` (a config.json), `--model` (a model directory's
config.json) or, by default, the shrunk tiny config of the definition's first `match`.
Prints the plan as tables, or with `--json` the HookPlan's JSON (`moedsl schema plan`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from moedsl.errors import MoedslError


def config_from_file(path: str | Path) -> Any:
    """A transformers config from a config.json: `AutoConfig.for_model(model_type, **rest)`."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
    from moedsl.models.tiny import quiet_transformers

    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as err:
        raise MoedslError(f"{path}: not a valid `{model_type}` config: {err}") from None


def model_config(definition, config: str | None, model_dir: str | None) -> tuple[Any, str]:
    """(config, where it came from)."""
    if config is not None:
        return config_from_file(config), f"config {config}"
    if model_dir is not None:
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise MoedslError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        return config_from_file(d / "config.json"), f"model directory {model_dir}"
    if not definition.header.matches:
        raise MoedslError(f"`{definition.header.name}` has no `match`: give --config or --model",
                          span=definition.header.span)
    from moedsl.models.tiny import tiny_config

    mt = definition.header.matches[0]
    return tiny_config(mt), f"transformers' own `{mt}` config, shrunk"


def meta_model(config: Any) -> Any:
    from moedsl.models.tiny import build_model

    try:
        return build_model(config, device="meta")
    except MoedslError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MoedslError(f"could not build the model from its config: {type(err).__name__}: {err}") from None


def run_plan(args) -> int:
    from moedsl.lang.library import load
    from moedsl.plan.compiler import as_policy, compile_plan

    policy = as_policy(args.policy)  # bad policies fail before any model is built
    tokens = getattr(args, "tokens", None)
    if tokens is None:
        from moedsl.plan.compiler import DEFAULT_TOKENS

        tokens = DEFAULT_TOKENS
    if tokens < 1:
        raise MoedslError(f"--tokens must be a positive integer, not {tokens}")
    definition = load(args.file)
    config, _source = model_config(definition, getattr(args, "config", None), getattr(args, "model", None))
    model = meta_model(config)
    plan = compile_plan(definition, model, policy=policy, tokens=tokens)
    if args.json:
        sys.stdout.write(plan.model_dump_json(indent=2) + "\n")
        return 0
    from rich.console import Console

    from moedsl.plan.table import print_plan

    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((180, 24)).columns, 180)
    print_plan(plan, Console(highlight=False, width=width))
    return 0
