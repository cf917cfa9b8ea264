"""The built wheel, installed into a fresh venv, works from outside the checkout.

Builds the wheel from this checkout, installs it with `--no-deps` into a venv that sees the
system's packages (torch, transformers, ... are not downloaded again), and runs the installed
`moedsl` entry point from a temporary directory, with no PYTHONPATH: `moedsl list`,
`moedsl validate qwen3_moe` and the quick start's `moedsl quantize`. A grammar or definition
library that resolved into the checkout instead of the installed package fails here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin directory, clean environment, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    wheels = root / "dist"
    # build from a clean copy: a stale build/ in the checkout could slip old files into the wheel,
    # and the build leaves nothing behind in the checkout (the links moedsl/grammars, moedsl/model_defs stay links)
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "moedsl-out", ".*-out"))
    # no build isolation: the build uses this Python's setuptools, offline and in seconds
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(src)], cwd=root, env=env)
    (wheel,) = wheels.glob("moedsl-*.whl")
    venv = root / "venv"
    bin_dir = venv / "bin"
    pip_version = tuple(int(x) for x in importlib.metadata.version("pip").split(".")[:2] if x.isdigit())
    if pip_version >= (22, 3):  # no pip inside the venv (ensurepip is slow): this pip installs into it
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=root, env=env)
        pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python")]
    else:
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=root, env=env)
        pip = [str(bin_dir / "python"), "-m", "pip"]
    _run([*pip, "install", "-q", "--no-deps", str(wheel)], cwd=root, env=env)
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}, work, wheel


def test_wheel_carries_grammar_and_library(installed):
    *_, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "model_defs").glob("*.moedef")}
    assert "moedsl/grammars/moedef.lark" in names
    assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("moedsl/model_defs/")} == shipped
    assert "moedsl/data/calib_text.txt" in names


def test_installed_moedsl_runs_outside_the_checkout(installed):
    bin_dir, env, work, _ = installed
    where = _run([str(bin_dir / "python"), "-c", "import moedsl, moedsl.lang.library as l, moedsl.lang.parser as p; "
                  "print(moedsl.__file__); print(l.LIBRARY_DIR); print(p.GRAMMAR_PATH)"], cwd=work, env=env)
    venv = bin_dir.parent.resolve()
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(venv), f"{line} is not inside the venv {venv}"

    listing = _run([str(bin_dir / "moedsl"), "list"], cwd=work, env=env)
    n_defs = len(list((REPO / "model_defs").glob("*.moedef")))
    assert f"{n_defs} definitions" in listing.stdout
    assert "qwen3_moe" in listing.stdout

    validated = _run([str(bin_dir / "moedsl"), "validate", "qwen3_moe"], cwd=work, env=env)
    assert "✓ structure" in validated.stdout and "✗" not in validated.stdout

    # the quick start's command (scripts/quickstart.sh); the default model comes from the session's cache
    out = work / "moedsl-out"
    _run([str(bin_dir / "moedsl"), "quantize", "--out", str(out)], cwd=work, env=env, timeout=600)
    report = json.loads((out / "moedsl-report.json").read_text())
    assert report["layers"], "the report lists no quantized layer"
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not (work / "moedsl-out" / ".moedsl-run").exists()
