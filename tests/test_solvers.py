"""Solvers (moedsl/solvers): the built-ins against their definitions, act order on the batched path
against the one-matrix path, a solver written outside the package plugged in through the CLI and the
library, and every solver's output read back by the independent unpacker in both formats."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import moedsl
from moedsl.errors import MoedslError
from moedsl.gptq.gptq import gptq_quantize
from moedsl.gptq.quantizer import QuantConfig, find_params, rtn_quantize
from moedsl.plan.schema import Target
from moedsl.solvers import Problem, resolve_solver
from moedsl.solvers.mse import find_params_mse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_ct, dequantize_gptq, read_checkpoint  # noqa: E402

RUN_KW = dict(group_size=32, samples=4, seq_len=32, progress=False)


def _target(i: int, out: int, cols: int) -> Target:
    return Target(id=f"t{i}", kind="linear", path=f"t{i}", in_features=cols, out_features=out, ckpt=f"t{i}", stats="k")


def _hessian(cols: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4 * cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)  # uneven columns: act order matters
    return 2 * X.transpose(1, 2) @ X / X.shape[1]


def _problem(n: int, shared: bool, cfg: QuantConfig, rows=(16, 16), cols=64, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    weights = tuple(torch.randn(n, r, cols, generator=g) for r in rows)
    H = _hessian(cols, 1 if shared else n, seed + 1)
    return Problem(weights, H, tuple(_target(j, r, cols) for j, r in enumerate(rows)), tuple(range(n)),
                   (128,) if shared else (128,) * n, cfg)


def _same(a, b):
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-5)
    assert (a.codes != b.codes).float().mean() < 1e-3  # fp32 sums in another order may flip a rare code
    torch.testing.assert_close(a.scales, b.scales)
    assert torch.equal(a.g_idx, b.g_idx)


# ---- built-ins against their definitions -------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_rtn_equals_rtn_quantize(shared):
    cfg = QuantConfig(bits=3, group_size=32)
    p = _problem(3, shared, cfg)
    out = resolve_solver("rtn").solve(p)
    for W, results in zip(p.weights, out):
        for i, r in enumerate(results):
            ref = rtn_quantize(W[i], cfg)
            assert torch.equal(r.codes, ref.codes) and torch.equal(r.weight, ref.weight)
            assert torch.equal(r.scales, ref.scales) and torch.equal(r.zeros, ref.zeros)
            assert r.loss == pytest.approx(ref.loss)


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_act_order_batched_equals_one_matrix(shared, static_groups):
    """GPTQ with activation order: the stacked (shared) and batched (per expert) solves give what
    solving each matrix alone gives."""
    cfg = QuantConfig(bits=4, group_size=16, act_order=True, static_groups=static_groups)
    p = _problem(4, shared, cfg)
    out = resolve_solver("gptq").solve(p)
    for W, results in zip(p.weights, out):
        for i, r in enumerate(results):
            _same(r, gptq_quantize(W[i], p.hessian[0 if shared else i], cfg))
            if static_groups:  # static groups keep g_idx trivial: what vLLM's MoE kernels load
                assert torch.equal(r.g_idx, torch.arange(W.shape[2], dtype=torch.int32) // 16)


def test_act_order_changes_the_solution():
    cfg = QuantConfig(bits=3, group_size=16, static_groups=True)
    p = _problem(2, False, cfg)
    plain = resolve_solver("gptq").solve(p)
    ordered = resolve_solver("gptq").solve(Problem(p.weights, p.hessian, p.targets, p.experts, p.tokens,
                                                   cfg.model_copy(update={"act_order": True})))
    assert not torch.equal(plain[0][0].codes, ordered[0][0].codes)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_grid_never_worse_than_min_max(sym):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g) ** 3  # heavy tails: clipping pays
    s0, z0 = find_params(w, 3, sym)
    s1, z1 = find_params_mse(w, 3, sym)

    def err(s, z):
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 7)
        return ((w - s[:, None] * (q - z[:, None])).abs() ** 2.4).sum(dim=1)

    e0, e1 = err(s0, z0), err(s1, z1)
    assert (e1 <= e0 + 1e-6).all()
    assert (e1 < e0).float().mean() > 0.5  # and strictly better for most rows of heavy-tailed weights
    assert (s1 <= s0 + 1e-7).all()  # a clipped range, never a wider one


def test_mse_solver_lowers_the_output_error_at_3_bits():
    from moedsl.execute.solving import output_error

    cfg = QuantConfig(bits=3, group_size=32)
    g = torch.Generator().manual_seed(5)
    W = (torch.randn(4, 32, 64, generator=g) ** 3,)
    H = _hessian(64, 4, 7)
    p = Problem(W, H, (_target(0, 32, 64),), tuple(range(4)), (256,) * 4, cfg)
    errs = {}
    for name in ("rtn", "gptq", "mse"):
        Q = torch.stack([r.weight for r in resolve_solver(name).solve(p)[0]])
        errs[name] = float(output_error(W[0], Q, H, cfg)[0].sum())
    assert errs["gptq"] < errs["rtn"] and errs["mse"] < errs["gptq"], errs


# ---- naming a solver ---------------------------------------------------------------------------


def test_unknown_solver_names_the_choices():
    with pytest.raises(MoedslError) as e:
        resolve_solver("gtpq")
    assert "gptq" in e.value.render() and "did you mean" in e.value.render()


def test_broken_solver_files(tmp_path):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    for spec, needle in ((f"{tmp_path}/nope.py:S", "no such file"), (f"{tmp_path}/bad.py:S", "boom"),
                         (f"{tmp_path}/empty.py:S", "defines no `S`"), (f"{tmp_path}/empty.py:X", "not a solver"),
                         ("no_such_module_xyz:S", "cannot import")):
        with pytest.raises(MoedslError) as e:
            resolve_solver(spec)
        assert needle in e.value.render(), (spec, e.value.render())


# ---- a solver from outside the package ---------------------------------------------------------

OUTSIDE = '''
"""A quantizer author's solver, in a file of its own: GPTQ, recording what it returned."""
import torch
from moedsl.solvers.gptq import GPTQ

RECORDED = {}


class RecordingGPTQ:
    name = "recording-gptq"

    def solve(self, problem):
        results = GPTQ().solve(problem)
        for t, rs in zip(problem.targets, results):
            for e, r in zip(problem.experts or (None,), rs):
                name = t.ckpt if e is None else t.ckpt.format(e=e)
                RECORDED[(problem.layer, name)] = r.dequantize().clone()
        return results
'''


def _load_outside(tmp_path):
    path = tmp_path / "my_solver.py"
    path.write_text(textwrap.dedent(OUTSIDE))
    return path


def test_outside_solver_through_the_cli(tmp_path, default_model, cli):
    path = _load_outside(tmp_path)
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--solver", f"{path}:RecordingGPTQ", "--group-size", "32",
            "--samples", "4", "--seq-len", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "moedsl-report.json").read_text())
    assert report["solver"] == "recording-gptq" and report["options"]["solver"] == f"{path}:RecordingGPTQ"
    # the same bytes as the built-in GPTQ: the writers take a solver's results unchanged
    ref = tmp_path / "ref"
    r = cli("quantize", "--out", str(ref), "--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    for shard in sorted(ref.glob("*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_bad_solver_on_the_cli_exits_2(tmp_path, cli):
    r = cli("quantize", "--out", str(tmp_path / "o"), "--solver", "msee")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "mse" in r.stderr
    assert not (tmp_path / "o").exists()


def _read(out: Path, fmt: str, module: str) -> np.ndarray:
    tensors = read_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    if fmt == "gptq":
        return dequantize_gptq(tensors, module, config["quantization_config"])["weight"]
    return dequantize_ct(tensors, module, config["quantization_config"])["weight"]


ROUND_TRIPS = [(s, f) for s in ("rtn", "mse", "gptq+act", "gptaq", "gptaq-mse", "gptq-refit",
                                 "gptq-cd(sweeps=1)+act") for f in ("gptq", "compressed-tensors")]
ROUND_TRIPS.append(("gptq-refit+asym", "gptq"))  # refitted zero-points (compressed-tensors refuses asymmetric experts)


@pytest.mark.parametrize("solver, fmt", ROUND_TRIPS)
def test_every_solver_round_trips(solver, fmt, tmp_path, default_model):
    """What each solver returned is what the independent unpacker reads from the checkpoint
    (`+act`: act order with static groups; `+asym`: asymmetric grids)."""
    import importlib
    import re

    path = _load_outside(tmp_path)
    spec = importlib.util.spec_from_file_location(re.sub(r"\W", "_", f"outside_{solver}_{fmt}"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    name, *suffixes = solver.split("+")
    inner = resolve_solver(name)

    class Recording(mod.RecordingGPTQ):
        name = f"recording-{solver}"
        statistics = getattr(inner, "statistics", ("hessian",))  # gptaq: the cross statistics too

        def solve(self, problem):
            results = inner.solve(problem)
            for t, rs in zip(problem.targets, results):
                for e, r in zip(problem.experts or (None,), rs):
                    mod.RECORDED[(problem.layer, t.ckpt if e is None else t.ckpt.format(e=e))] = r.dequantize()
            return results

    extra = dict(act_order=True, static_groups=True) if "act" in suffixes else {}
    if "asym" in suffixes:
        extra["sym"] = False
    out = tmp_path / "out"
    report = moedsl.quantize(out=out, format=fmt, solver=Recording(), **RUN_KW, **extra)
    assert report.solver == report.options["solver"] == f"recording-{solver}"
    layers = json.loads((out / "moedsl-report.json").read_text())["layers"]
    assert mod.RECORDED and len(layers) >= 2
    prefix = "model.layers"
    for (layer, name), W in sorted(mod.RECORDED.items()):
        got = _read(out, fmt, f"{prefix}.{layer}.{name}")
        np.testing.assert_allclose(got, W.float().numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_docs_example_solver_runs():
    """The solver written in docs/solvers.md is a working solver."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "solvers.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class ClippedRTN" in b)
    scope: dict = {}
    exec(block, scope)
    solver = resolve_solver(scope["ClippedRTN"]())
    p = _problem(2, False, QuantConfig(bits=4, group_size=32))
    out = solver.solve(p)
    assert [len(r) for r in out] == [2, 2] and out[0][0].codes.shape == (16, 64)
