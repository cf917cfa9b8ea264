"""moedsl: declarative model definitions and a compiler for GPTQ-quantizing Mixture-of-Experts LLMs.

Library API:
    parse(text)            .moedef text → IR (as written)
    load(path_or_name)     a resolved definition (extends/use expanded)
    validate(def, ...)     check a definition against the real model classes
    for_model(model)       the library definition for a model or config
    compile_plan(...)      definition + model → hook plan
    quantize(...)          run GPTQ and write a checkpoint
"""

import time as _time

LAUNCHED = _time.perf_counter()  # when moedsl was first imported: the report's startup counts from here

from moedsl.errors import MoedslError, MoedslErrors, Span
from moedsl.lang.library import for_model, load
from moedsl.lang.parser import parse, parse_file

__all__ = ["MoedslError", "MoedslErrors", "Span", "parse", "parse_file", "load", "for_model", "validate",
           "bind", "compile_plan", "quantize"]


def validate(source, config=None, model_dir=None, model_type=None, trust_remote_code=False):
    """Validate a definition; returns one `Report` per model_type checked (see moedsl.bind.validate).
    `trust_remote_code=True` lets a model directory run its own modeling code (`auto_map`)."""
    from moedsl.bind.validate import validate as _validate

    return _validate(source, config=config, model_dir=model_dir, model_type=model_type,
                     trust_remote_code=trust_remote_code)


def bind(definition, model):
    """Bind a resolved definition to a model instance (meta device is enough)."""
    from moedsl.bind.binder import bind as _bind

    return _bind(definition, model)


def compile_plan(definition, model, policy="routed", tokens=None):
    """Compile a definition bound to `model` into a `HookPlan`."""
    from moedsl.plan.compiler import DEFAULT_TOKENS, compile_plan as _compile

    return _compile(definition, model, policy=policy, tokens=DEFAULT_TOKENS if tokens is None else tokens)


def quantize(**kwargs):
    """Quantize a model; the keyword arguments mirror `moedsl quantize` (see moedsl.execute.run), e.g.
    `trust_remote_code=True` for a model directory that ships its own modeling code."""
    from moedsl.execute.run import quantize as _quantize

    return _quantize(**kwargs)
