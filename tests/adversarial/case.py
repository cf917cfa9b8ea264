"""What an adversarial case is, and what "handled" means.

A case builds its inputs in a fresh temporary directory (`Workspace`), names the `moedsl`
command line to run, and says what a correct outcome is (`expect`):

- `ok()`: exit 0 and a complete, readable checkpoint in `ws.out`;
- `error(*needles)`: exit 2, and stderr says where the problem is: every needle (the option, the
  file name, the line:col, the tensor name …) occurs in it;
- `either(*needles)`: whichever of the two the tool chooses, done correctly.

Whatever the expectation, a case is handled only if stderr holds no Python traceback, every file
that existed outside `ws.out` before the run is byte-identical after it (and nothing was added
there), and a failed run leaves no output directory that looks complete.

A `cases_<topic>.py` module exports `CASES`, a list of `Case`. A case may replace how the command
runs (`execute`: kills, concurrent runs) and add checks of its own (`check`).

Each command is a real process of its own, forked from a server that has imported moedsl, torch and
transformers once (`tests/cli_process.py`); a case marked `fresh` (and every case when
`MOEDSL_LONG_TESTS=1`) runs `python -m moedsl` in a fresh interpreter instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Expect:
    outcome: str  # "ok" | "error" | "either"
    needles: tuple[str, ...] = ()


def ok() -> Expect:
    return Expect("ok")


def error(*needles: str) -> Expect:
    return Expect("error", needles)


def either(*needles: str) -> Expect:
    return Expect("either", needles)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0


class Workspace:
    """A case's temporary directory, with copies of the shared tiny models."""

    def __init__(self, root: Path, models: "Models"):
        self.root = root
        self.models = models
        self.out = root / "out"

    def model(self, name: str = "qwen3_moe", dest: str | None = None) -> Path:
        """A private copy of a shared tiny model (`Models.SPECS` names them), free to damage."""
        src = self.models.get(name)
        dst = self.root / (dest or name)
        shutil.copytree(src, dst)
        return dst

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


class Models:
    """Tiny models built once per harness run and shared (read-only) between cases."""

    # name -> (model_type, overrides)
    SPECS: dict[str, tuple[str, dict]] = {
        "qwen3_moe": ("qwen3_moe", {}),
        "mixtral": ("mixtral", {}),
        "qwen3_moe_4layers": ("qwen3_moe", {"num_hidden_layers": 4}),
    }

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self._made:
            from moedsl.models.tiny import save_tiny

            model_type, overrides = self.SPECS[name]
            self._made[name] = save_tiny(model_type, self.root / name, **overrides)
        return self._made[name]


Build = Callable[[Workspace], list[str]]  # makes the inputs, returns the argv after `moedsl`
Execute = Callable[[Workspace, list[str], dict, float], Result]
Check = Callable[[Workspace, Result], list[str]]  # extra problems, [] when fine


@dataclass(frozen=True)
class Case:
    name: str
    klass: str  # the class of bad input, e.g. "model-dir", "calibration", "options", "fmt"
    build: Build
    expect: Expect
    env: dict = field(default_factory=dict)
    execute: Execute | None = None
    check: Check | None = None
    timeout: float = 300.0  # generous: a busy CI machine is slow; a hang still ends
    fresh: bool = False  # run as `python -m moedsl` in a fresh interpreter (not forked from the server)


# ---- running one command ----------------------------------------------------------------


def cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(ws: Workspace, argv: list[str], env: dict, timeout: float) -> Result:
    """The command in a process forked from the preloaded server (tests/cli_process.py)."""
    from tests import cli_process

    try:
        p = cli_process.run(argv, ws.root, env, timeout)
        return Result(p.returncode, p.stdout, p.stderr, p.seconds)
    except subprocess.TimeoutExpired as exc:
        return Result(-9, "", (exc.stderr or "") + f"\n[harness] timed out after {timeout:.0f} s", timeout)


def run_fresh_cli(ws: Workspace, argv: list[str], env: dict, timeout: float) -> Result:
    """The command as `python -m moedsl` in a fresh interpreter."""
    import time

    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "moedsl", *argv], cwd=ws.root, env=env, capture_output=True,
                           text=True, errors="replace", timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(-9, "", err + f"\n[harness] timed out after {timeout:.0f} s", time.perf_counter() - t0)


def without_file_override() -> None:
    """A `preexec_fn`: the child loses root's power to write files whose mode forbids it (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH leave the bounding set, so the exec'd process never has them)."""
    if os.getuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_cli_unprivileged(ws: Workspace, argv: list[str], env: dict, timeout: float) -> Result:
    """`run_cli`, but file modes bind the command even when the harness runs as root."""
    import time

    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "moedsl", *argv], cwd=ws.root, env=env, capture_output=True, text=True,
                       errors="replace", timeout=timeout, preexec_fn=without_file_override)
    return Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


# ---- judging ----------------------------------------------------------------------------


def snapshot(root: Path, exclude: Path) -> dict[str, str]:
    """path -> sha256 of every file under `root` outside `exclude` (symlinks by their target)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == exclude or exclude in d.parents:
            dirnames[:] = []
            continue
        for name in filenames:
            p = d / name
            if p == exclude:
                continue
            try:
                out[str(p.relative_to(root))] = ("link:" + os.readlink(p)) if p.is_symlink() else \
                    hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError as exc:
                out[str(p.relative_to(root))] = f"unreadable: {exc}"
    return out


def looks_complete(out: Path) -> str | None:
    """Why a loader would take `out` as a finished checkpoint, or None."""
    if not out.is_dir():
        return None
    cfg = out / "config.json"
    if cfg.is_file():
        try:
            if "quantization_config" in json.loads(cfg.read_text()):
                return "config.json with quantization_config"
        except (ValueError, OSError):
            pass
    for name in ("quantize_config.json", "moedsl-report.json"):
        if (out / name).is_file():
            return name
    return None


def checkpoint_problems(out: Path) -> list[str]:
    """A finished run's output: configs, index, every indexed tensor present, finite, quantized."""
    from safetensors import safe_open

    problems = []
    if looks_complete(out) is None:
        return [f"{out} holds no finished checkpoint"]
    try:
        report = json.loads((out / "moedsl-report.json").read_text())
        if not report.get("layers"):
            problems.append("the report lists no layers")
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"unreadable report or index: {exc}"]
    by_shard: dict[str, list[str]] = {}
    for key, shard in index.items():
        by_shard.setdefault(shard, []).append(key)
    quantized = 0
    for shard, keys in by_shard.items():
        try:
            with safe_open(str(out / shard), "pt") as f:
                have = set(f.keys())
                for k in keys:
                    if k not in have:
                        problems.append(f"{shard} lacks indexed tensor {k}")
                        continue
                    t = f.get_tensor(k)
                    if t.is_floating_point() and not t.isfinite().all():
                        problems.append(f"{k} holds NaN/Inf")
                    quantized += k.endswith((".qweight", ".weight_packed"))
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is a problem to report
            problems.append(f"{shard}: {exc}")
    if not quantized:
        problems.append("no quantized tensor in the checkpoint")
    return problems


def judge(case: Case, ws: Workspace, before: dict[str, str], res: Result, argv: list[str]) -> list[str]:
    """Why the case was not handled ([] when it was). Only `quantize` owes a checkpoint on success."""
    problems: list[str] = []
    if "Traceback (most recent call last)" in res.stderr:
        problems.append("traceback in stderr")
    after = snapshot(ws.root, ws.out)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before)
    if changed:
        problems.append(f"inputs changed or removed: {changed[:5]}")
    if added:
        problems.append(f"files written outside --out: {added[:5]}")
    want = case.expect.outcome
    if res.returncode == 0 and want in ("ok", "either"):
        if argv and argv[0] == "quantize":
            problems += checkpoint_problems(ws.out)
    elif res.returncode == 2 and want in ("error", "either"):
        if not res.stderr.strip():
            problems.append("exit 2 with nothing on stderr")
        missing = [n for n in case.expect.needles if n not in res.stderr]
        if missing:
            problems.append(f"the message does not say {missing}")
        why = looks_complete(ws.out)
        if why:
            problems.append(f"failed, but {ws.out.name}/ looks complete ({why})")
    else:
        problems.append(f"exit {res.returncode}, expected {'0' if want == 'ok' else '2' if want == 'error' else '0 or 2'}")
    if case.check is not None:
        try:
            problems += case.check(ws, res)
        except Exception as exc:  # a check reading what a failed run never wrote: one more problem, not a crash
            problems.append(f"the case's own check failed: {type(exc).__name__}: {exc}")
    return problems


# ---- helpers for the cases ---------------------------------------------------------------

SMALL_RUN = ["--group-size", "32", "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress"]


def quantize(ws: Workspace, model: Path | None, *extra: str) -> list[str]:
    """`quantize` of `model` into `ws.out` with a small, fast run (later options win)."""
    return ["quantize", *(["--model", str(model)] if model is not None else []), "--out", str(ws.out),
            *SMALL_RUN, *extra]


def edit_config(model: Path, **changes) -> None:
    """Change keys of `model`/config.json (a value of `DELETE` removes the key)."""
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))


DELETE = object()


def edit_tensors(model: Path, fn) -> None:
    """Rewrite `model`/model.safetensors with `fn(dict of tensors) -> dict of tensors`."""
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path), metadata={"format": "pt"})


def report_of(ws: Workspace) -> dict:
    return json.loads((ws.out / "moedsl-report.json").read_text())
