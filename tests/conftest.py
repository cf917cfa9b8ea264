"""Shared fixtures: an isolated moedsl cache (so the built-in default model is built once per
session in a temporary directory, never in ~/.cache), the default model's directory, tiny models
per model_type, and a helper that runs the real CLI as a process of its own."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests import cli_process

REPO = Path(__file__).resolve().parent.parent

# transformers copies a model directory's own code (trust_remote_code) into its modules cache:
# keep the tests' copies out of ~/.cache (set before transformers is imported; subprocesses inherit it)
os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / f"moedsl-tests-hf-modules-{os.getuid()}"))


@pytest.fixture(scope="session", autouse=True)
def moedsl_cache(tmp_path_factory) -> Path:
    """`MOEDSL_CACHE` points at a session temporary directory for every test (and subprocess)."""
    cache = tmp_path_factory.mktemp("moedsl-cache")
    old = os.environ.get("MOEDSL_CACHE")
    os.environ["MOEDSL_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MOEDSL_CACHE", None)
    else:
        os.environ["MOEDSL_CACHE"] = old


@pytest.fixture(scope="session")
def default_model(moedsl_cache) -> Path:
    """The built-in default model's directory (built on first use in the session cache)."""
    from moedsl.models.default import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(model_type, **overrides) -> a saved tiny checkpoint, built once per session."""
    from moedsl.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple, Path] = {}

    def make(model_type: str, **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in made:
            name = model_type + "".join(f"-{k}={v}" for k, v in key[1])
            made[key] = save_tiny(model_type, root / name, **overrides)
        return made[key]

    return make


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> cli_process.Completed:
    """`moedsl ARGS` as a process of its own, from the repository root, with this session's environment:
    forked from the server that has imported moedsl once (tests/cli_process.py; `python -m moedsl` in a
    fresh interpreter with `MOEDSL_LONG_TESTS=1`). `returncode`, `stdout`, `stderr` as `subprocess.run`'s."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return cli_process.run([str(a) for a in args], REPO, full_env, timeout)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one thread is fastest, and immune to a busy machine
    (several OpenMP threads on shared cores stall each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPORT_NAME = "moedsl-report.json"
# report keys that vary run to run
TIMING = frozenset({"seconds", "host_peak_bytes", "peak_gpu_bytes", "phases", "phases_s", "phase_peak_gpu_gib"})


def report_results(out: Path, skip: frozenset | set = frozenset()) -> dict:
    """A run's report without its timing and memory figures, nor the keys in `skip`, at any depth."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING and k not in skip}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads((out / REPORT_NAME).read_text()))


def assert_same_checkpoint(out: Path, ref: Path, skip: frozenset | set = frozenset()) -> None:
    """The same files, byte for byte, and the same report but for timing and the keys in `skip`."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in sorted(ref.iterdir()):
        if p.name != REPORT_NAME:
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert report_results(out, skip) == report_results(ref, skip)
