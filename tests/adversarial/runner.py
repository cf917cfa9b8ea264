"""Run every adversarial case as a real CLI process and judge it (`python -m tests.adversarial`).

Cases come from the `cases_*.py` modules beside this file (each exports `CASES`). Inputs are
built serially (the shared tiny models once), the commands run in parallel (`-j`, default: the
CPU count), and every case is judged by `case.judge`. Prints one line per case that was not
handled and `N cases, M handled`; exits 1 unless every case was handled.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import pkgutil
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tests.adversarial import case as C
from tests.cli_process import fresh_python

HERE = Path(__file__).resolve().parent


def all_cases() -> list[C.Case]:
    cases: list[C.Case] = []
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("cases_")):
        cases += importlib.import_module(f"tests.adversarial.{mod}").CASES
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate case names: {sorted(dup)}")
    return cases


def run_cases(cases: list[C.Case], jobs: int | None = None, keep: Path | None = None,
              on_result=None) -> list[tuple[C.Case, C.Result, list[str]]]:
    """Build, run and judge `cases`; returns (case, result, problems) per case."""
    import os

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="moedsl-adversarial-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    env_base = {"MOEDSL_CACHE": str(cache)}
    models = C.Models(root / "models")
    from moedsl.models.default import default_model_dir

    default_model_dir(cache)  # built once here, not by the first cases at the same time
    prepared = []
    for i, case in enumerate(cases):
        ws = C.Workspace(root / f"{i:03d}-{case.name}", models)
        ws.root.mkdir()
        try:
            argv = case.build(ws)
        except Exception as exc:  # noqa: BLE001 - a broken case is reported, not fatal
            prepared.append((case, ws, None, {}, f"building the inputs failed: {type(exc).__name__}: {exc}"))
            continue
        prepared.append((case, ws, argv, C.snapshot(ws.root, ws.out), None))

    def one(item):
        case, ws, argv, before, broken = item
        if broken:
            return case, C.Result(-1, "", broken), [broken]
        env = C.cli_env({**env_base, **case.env})
        execute = case.execute or (C.run_fresh_cli if case.fresh or fresh_python() else C.run_cli)
        res = execute(ws, argv, env, case.timeout)
        return case, res, C.judge(case, ws, before, res, argv)

    jobs = jobs or os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, item) for item in prepared]
        for f in as_completed(futures):
            if on_result is not None:
                on_result(*f.result())
        results = [f.result() for f in futures]
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return results


def describe(case: C.Case, res: C.Result, problems: list[str]) -> str:
    """One case's outcome: a line, its problems and the tail of its stderr."""
    lines = [f"{'FAIL' if problems else 'ok  '} {case.klass:12s} {case.name} (exit {res.returncode}, "
             f"{res.seconds:.1f} s)"]
    lines += [f"       - {pr}" for pr in problems]
    lines += [f"       | {line[:240]}" for line in res.stderr.strip().splitlines()[-6:]]
    return "\n".join(lines)


def summary(results) -> str:
    handled = sum(not problems for _, _, problems in results)
    return f"{len(results)} cases, {handled} handled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.adversarial", description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="pattern", help="only cases whose name or class matches this glob")
    p.add_argument("-j", "--jobs", type=int, help="cases run at once (default: CPU count)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case, with its stderr tail")
    p.add_argument("--keep", type=Path, help="build the cases under this directory and keep it")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    cases = all_cases()
    if args.pattern:
        cases = [c for c in cases if fnmatch.fnmatch(c.name, args.pattern) or fnmatch.fnmatch(c.klass, args.pattern)]
    if args.list:
        for c in cases:
            print(f"{c.klass:14s} {c.name}")
        return 0
    t0 = time.perf_counter()

    def show(case, res, problems):
        if problems or args.verbose:
            print(describe(case, res, problems), flush=True)

    results = run_cases(cases, args.jobs, args.keep, on_result=show)
    print(f"{summary(results)} in {time.perf_counter() - t0:.0f} s")
    return 0 if all(not pr for _, _, pr in results) else 1
