"""`moedsl plan FILE [--config FILE | --model DIR] [--trust-remote-code] [--policy P] [--tokens N] [--json]`.

The definition is a `.moedef` file or a library name. The model structure is built on the
meta device (no weights) from `--config` (a config.json), `--model` (a model directory's
config.json) or, by default, the shrunk tiny config of the definition's first `match`.
`--trust-remote-code` lets a config or model directory bring its own classes (`auto_map`).
Prints the plan as tables, or with `--json` the HookPlan's JSON (`moedsl schema plan`).
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

from moedsl.errors import MoedslError
from moedsl.models.source import build, config_for


def model_config(definition, config: str | None, model_dir: str | None,
                 trust_remote_code: bool = False) -> tuple[Any, str]:
    """(config, where it came from); without --config or --model, the definition's first `match`."""
    if config is None and model_dir is None and not definition.header.matches:
        raise MoedslError(f"`{definition.header.name}` has no `match`: give --config or --model",
                          span=definition.header.span)
    mt = definition.header.matches[0] if definition.header.matches else None
    return config_for(mt, config, model_dir, trust_remote_code)


def run_plan(args) -> int:
    from moedsl.lang.library import load
    from moedsl.plan.compiler import as_policy, compile_plan

    policy = as_policy(args.policy)  # bad policies fail before any model is built
    tokens = args.tokens
    if tokens < 1:
        raise MoedslError(f"--tokens must be a positive integer, not {tokens}")
    definition = load(args.file)
    trust = bool(getattr(args, "trust_remote_code", False))
    config, _source = model_config(definition, getattr(args, "config", None), getattr(args, "model", None), trust)
    model = build(config, "meta", trust)
    plan = compile_plan(definition, model, policy=policy, tokens=tokens)
    if args.json:
        sys.stdout.write(plan.model_dump_json(indent=2) + "\n")
        return 0
    from rich.console import Console

    from moedsl.plan.table import print_plan

    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((180, 24)).columns, 180)
    print_plan(plan, Console(highlight=False, width=width))
    return 0
