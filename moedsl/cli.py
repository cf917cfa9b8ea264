"""The `moedsl` command line: fmt, validate, list, plan, schema, quantize.

Bad input of any kind prints a located message and exits 2; a Python traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from moedsl.errors import MoedslError
from moedsl.plan.schema import DEFAULT_TOKENS

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 1


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def cmd_fmt(args) -> int:
    from moedsl.lang.parser import parse
    from moedsl.lang.printer import definition
    from moedsl.textfile import read_text, write_text_atomic

    status = 0
    for f in args.files:
        text = read_text(f)
        out = definition(parse(text, str(f)))
        if args.check:
            if text != out:
                print(f"{f}: would be reformatted", file=sys.stderr)
                status = EXIT_CHECK_FAILED
        elif args.write:
            if text != out:
                write_text_atomic(f, out)
                print(f"reformatted {f}", file=sys.stderr)
        else:
            sys.stdout.write(out)
    return status


def cmd_validate(args) -> int:
    from moedsl.bind.validate import validate

    reports = []
    for f in args.files:
        reports += validate(f, config=args.config, model_dir=args.model, model_type=args.model_type,
                            trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps([r.model_dump() for r in reports], indent=2))
    else:
        con = _console()
        for r in reports:
            mark = "[green]ok[/green]" if r.ok else "[red]FAILED[/red]"
            con.print(f"{r.file}: {r.arch} on {r.model_type} ({r.model_source}): {mark}")
            if r.remote_code:
                con.print(f"  ran the model directory's own code: {', '.join(r.remote_code)}")
            for c in r.checks:
                sign = "[green]✓[/green]" if c.passed else "[red]✗[/red]"
                con.print(f"  {sign} {c.name}: {c.detail}")
            for p in r.problems:
                print(p, file=sys.stderr)
                print(file=sys.stderr)
    return 0 if all(r.ok for r in reports) else EXIT_BAD_INPUT


def cmd_list(args) -> int:
    from moedsl.lang.library import all_definitions

    defs = all_definitions()
    if args.json:
        print(json.dumps([{"arch": d.header.name, "matches": list(d.header.matches), "file": d.source_file,
                           "moe": any(_has_moe(k.items) for k in d.layers)} for d in defs], indent=2))
        return 0
    table = Table(title=f"{len(defs)} definitions")
    for col in ("arch", "model_type(s)", "MoE", "layer kinds"):
        table.add_column(col)
    for d in defs:
        table.add_row(d.header.name, ", ".join(d.header.matches), "yes" if any(_has_moe(k.items) for k in d.layers) else "",
                      " ".join(k.name for k in d.layers))
    _console().print(table)
    return 0


def _has_moe(items) -> bool:
    from moedsl.lang import ir

    return any(isinstance(it, ir.Module) and it.role == "moe" for it in ir.walk_items(items))


def cmd_plan(args) -> int:
    from moedsl.plan.cli import run_plan

    return run_plan(args)


def cmd_schema(args) -> int:
    if args.what == "plan":
        from moedsl.plan.schema import HookPlan

        print(json.dumps(HookPlan.model_json_schema(), indent=2))
    elif args.what == "ir":
        from moedsl.lang.ir import Definition

        print(json.dumps(Definition.model_json_schema(), indent=2))
    else:
        from moedsl.bind.validate import Report

        print(json.dumps(Report.model_json_schema(), indent=2))
    return 0


def cmd_quantize(args) -> int:
    from moedsl.execute.pinned import configure_pinned_memory

    configure_pinned_memory()  # before torch is imported: its allocator reads the settings once
    from moedsl.execute.cli import run_quantize
    from moedsl.execute.options import QuantizeOptions

    # Refuse bad numbers (--bits 9, --group-size 0, --damp 2) before any heavy work: the run itself
    # checks them only after building the default model, loading weights and creating --out.
    opts = QuantizeOptions(**{k: v for k, v in vars(args).items() if k in QuantizeOptions.model_fields})
    opts.quant_config()
    opts.moe_policy()
    from moedsl.solvers import resolve_solver

    resolve_solver(opts.solver)
    return run_quantize(args)


def build_parser() -> argparse.ArgumentParser:
    from moedsl.execute.arguments import TRUST_HELP

    p = argparse.ArgumentParser(prog="moedsl", description="GPTQ quantization of MoE LLMs from declarative model definitions")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fmt", help="print .moedef files in canonical form")
    f.add_argument("files", nargs="+")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not in canonical form")
    g.add_argument("--write", "-w", action="store_true", help="rewrite the files in place")
    f.set_defaults(func=cmd_fmt)

    v = sub.add_parser("validate", help="check definitions against the real model classes")
    v.add_argument("files", nargs="+", help=".moedef files or library names")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--config", help="a config.json to build the model from (meta device)")
    src.add_argument("--model", help="a Hugging Face model directory")
    src.add_argument("--model-type", help="check against this model_type's shrunk config (default: every `match`)")
    v.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)

    ls = sub.add_parser("list", help="list the definitions in the library")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    pl = sub.add_parser("plan", help="compile a definition and a model into a hook plan and print it")
    pl.add_argument("file", help=".moedef file or library name")
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--config")
    src.add_argument("--model")
    pl.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    pl.add_argument("--policy", default="routed", help="routed | all | topk=N | auto(min_tokens=N)")
    pl.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens, for the memory estimate")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    sc = sub.add_parser("schema", help="print a JSON schema")
    sc.add_argument("what", choices=["plan", "ir", "report"])
    sc.set_defaults(func=cmd_schema)

    q = sub.add_parser("quantize", help="GPTQ-quantize a model (default: the built-in tiny MoE)")
    from moedsl.execute.arguments import add_quantize_arguments  # torch-free: `fmt`, `--help` stay fast

    add_quantize_arguments(q)
    q.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoedslError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
