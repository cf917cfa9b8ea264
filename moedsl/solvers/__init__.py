"""Solvers: what turns a weight and its calibration statistics into quantized codes.

The executor hands a solver one `Problem` at a time: the targets of one stage that share one
statistics key, each as a stack of matrices `[n, out, in]` (the experts of a fused or
ModuleList block, or one nn.Linear with n = 1), with the Hessian(s) of that key. The solver
returns one `QuantResult` per matrix; the writers, the report and resume take those whatever
solver made them.

    class MySolver:
        name = "my-solver"
        def solve(self, problem: Problem) -> list[list[QuantResult]]:
            ...   # [target][matrix], matrices in the order of problem.experts

Built-in solvers (each a short module beside this one, selected by `--solver NAME` or
`moedsl.quantize(solver=NAME or an object)`):

    gptq   GPTQ (the default); with --act-order --static-groups, activation order on the
           batched path, in a form serving engines load
    rtn    round-to-nearest on the same grids
    mse    GPTQ whose group grids minimise the grid's own rounding error (a clipping search)
    gptaq  GPTAQ: GPTQ fitted to the full-precision model's outputs (asymmetric calibration);
           gptaq-mse on the mse grids; `gptaq(alpha=0.5)` sets its α
    X-refit   X (gptq, mse, gptaq, gptaq-mse), then each group's scale (and zero) refitted to
           the codes in closed form
    X-cd   X, then coordinate descent on the codes alternated with that refit (QuantEase);
           `gptq-cd(sweeps=3)` sets the rounds
    Every GPTQ-family solver takes `damp=` (its own damp_percent): `gptq(damp=0.001)`.

A solver outside the package is named `path/to/file.py:Name` or `package.module:Name`; Name is
a class (instantiated with no arguments) or an object with `name` and `solve`.

A solver that needs more than the Hessian says so in `statistics` (default `("hessian",)`):
`"cross"` makes the executor carry the full-precision model's activations beside the quantized
model's and hand the solver `Problem.cross`; other solvers pay nothing for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from moedsl.errors import MoedslError, nearest
from moedsl.gptq.quantizer import QuantConfig, QuantResult
from moedsl.plan.schema import Target

__all__ = ["Problem", "Solver", "BUILTIN", "resolve_solver", "solver_name", "wants_cross"]


@dataclass(frozen=True, eq=False)
class Problem:
    """The targets of one stage that share one statistics key, ready to solve.

    weights   one fp32 tensor [n, out_j, in] per target, on the device; the solver may not modify them
    hessian   fp32 [1, in, in] (one Hessian shared by every matrix) or [n, in, in] (one per matrix):
              H = 2/N Σ x xᵀ over the N input rows the matrix saw
    targets   the plan entries (role, experts, shared or routed expert, checkpoint name)
    experts   the expert index of each of the n matrices; () for an nn.Linear (n = 1)
    tokens    rows of calibration input behind each Hessian ([1] or [n]); 0: no statistics (the
              Hessian is then the identity, so GPTQ rounds to nearest)
    cross     fp32, shaped as `hessian`, for solvers that ask for it (`statistics` names "cross"),
              else None: D = 2/N Σ (x − x̃) x̃ᵀ, x̃ the quantized model's input row, x the
              full-precision model's input at the same token (D[a, b] = 2/N Σ (x − x̃)_a x̃_b)
    cache     for a shared Hessian cut into chunks of experts (every expert's gate and up under `all`):
              one dict, the same for every chunk of that key; else None. A solver may keep there
              what it derives from the Hessian alone, so that work runs once per key (GPTQ keeps
              its factorization of H⁻¹: for a DeepSeek-V3 layer, 1 instead of one per chunk)
    cfg       bits, group size, symmetry, act order, damping
    layer     the decoder layer's index (None for lm_head)
    where     names the problem in messages: `layer 3 mlp.experts.{e}.down_proj`
    """

    weights: tuple[torch.Tensor, ...]
    hessian: torch.Tensor
    targets: tuple[Target, ...]
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    cfg: QuantConfig
    layer: int | None = None
    where: str = ""
    cross: torch.Tensor | None = None
    cache: dict | None = None

    @property
    def shared(self) -> bool:
        """One Hessian for every matrix (q/k/v, or every expert's gate and up under `all`)."""
        return self.hessian.shape[0] == 1

    @property
    def n(self) -> int:
        return self.weights[0].shape[0]


@runtime_checkable
class Solver(Protocol):
    name: str

    def solve(self, problem: Problem) -> list[list[QuantResult]]:
        """One QuantResult per matrix: result[j][i] for target j, matrix i."""
        ...


def _builtin() -> dict[str, type]:
    from moedsl.solvers.descent import Descent, GPTAQDescent, GPTAQMSEDescent, MSEDescent
    from moedsl.solvers.gptaq import GPTAQ, GPTAQMSE
    from moedsl.solvers.gptq import GPTQ
    from moedsl.solvers.mse import MSE
    from moedsl.solvers.refit import GPTAQMSERefit, GPTAQRefit, MSERefit, Refit
    from moedsl.solvers.rtn import RTN

    return {"gptq": GPTQ, "rtn": RTN, "mse": MSE, "gptaq": GPTAQ, "gptaq-mse": GPTAQMSE,
            "gptq-refit": Refit, "mse-refit": MSERefit, "gptaq-refit": GPTAQRefit, "gptaq-mse-refit": GPTAQMSERefit,
            "gptq-cd": Descent, "mse-cd": MSEDescent, "gptaq-cd": GPTAQDescent, "gptaq-mse-cd": GPTAQMSEDescent}


BUILTIN = ("gptq", "rtn", "mse", "gptaq", "gptaq-mse", "gptq-refit", "mse-refit", "gptaq-refit", "gptaq-mse-refit",
           "gptq-cd", "mse-cd", "gptaq-cd", "gptaq-mse-cd")
_WITH_OPTIONS = re.compile(r"^([a-z][a-z0-9-]*)\((.*)\)$")


def wants_cross(solver: Solver) -> bool:
    """Whether a solver asks for the cross statistic (and so for the full-precision activations)."""
    return "cross" in tuple(getattr(solver, "statistics", ("hessian",)))


def solver_name(solver: str | Solver) -> str:
    """What the report and the resume fingerprint record for a solver."""
    return solver if isinstance(solver, str) else str(getattr(solver, "name", type(solver).__name__))


def resolve_solver(spec: str | Solver) -> Solver:
    """A built-in name, `file.py:Name`, `package.module:Name`, or a solver object."""
    if not isinstance(spec, str):
        return _check(spec, repr(spec))
    builtin = _builtin()
    if spec in builtin:
        return builtin[spec]()
    options = _WITH_OPTIONS.match(spec.strip())
    if options and options.group(1) in builtin:
        return _with_options(builtin[options.group(1)], options.group(1), options.group(2), spec)
    if ":" not in spec:
        raise MoedslError(f"--solver {spec}: unknown solver", expected=list(BUILTIN),
                          suggestion=nearest(spec, BUILTIN),
                          notes=["a solver of your own is `path/to/file.py:ClassName` or `package.module:ClassName`"])
    where, _, attr = spec.rpartition(":")
    module = _import(where, spec)
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise MoedslError(f"--solver {spec}: `{where}` defines no `{attr}`", suggestion=nearest(attr, names))
    obj = getattr(module, attr)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # the user's constructor: report it, never a traceback
            raise MoedslError(f"--solver {spec}: `{attr}()` failed: {type(exc).__name__}: {exc}") from None
    return _check(obj, spec)


def _with_options(cls: type, name: str, text: str, spec: str) -> Solver:
    """A built-in with keyword options, `gptaq(alpha=0.5)`: numbers only."""
    kwargs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise MoedslError(f"--solver {spec}: `{part}` is not `option=number`") from None
        if not eq:
            raise MoedslError(f"--solver {spec}: `{part}` is not `option=number`")
    try:
        return cls(**kwargs)
    except TypeError:
        import inspect

        known = [p for p in inspect.signature(cls).parameters]
        raise MoedslError(f"--solver {spec}: `{name}` takes " + (f"the options {', '.join(known)}" if known else
                                                                 "no options"),
                          suggestion=nearest(next(iter(kwargs), ""), known) if known else None) from None


def _import(where: str, spec: str):
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise MoedslError(f"--solver {spec}: no such file {path}")
        name = f"moedsl_user_solver_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise MoedslError(f"--solver {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise MoedslError(f"--solver {spec}: cannot import `{where}`: {type(exc).__name__}: {exc}") from None


def _check(obj, spec: str) -> Solver:
    if not isinstance(getattr(obj, "name", None), str) or not callable(getattr(obj, "solve", None)):
        raise MoedslError(f"--solver {spec}: not a solver (it needs a `name` string and a `solve(problem)` method)")
    return obj


def check_results(solver: Solver, problem: Problem, results: Sequence[Sequence[QuantResult]]) -> None:
    """A solver's answer must have one result per matrix, with the shapes the writers expect."""
    bad = None
    if len(results) != len(problem.targets):
        bad = f"{len(results)} result lists for {len(problem.targets)} targets"
    else:
        for W, rs, t in zip(problem.weights, results, problem.targets):
            if len(rs) != W.shape[0]:
                bad = f"{len(rs)} results for the {W.shape[0]} matrices of `{t.id}`"
                break
            for r in rs:
                if not isinstance(r, QuantResult) or tuple(r.codes.shape) != tuple(W.shape[1:]):
                    bad = f"a result for `{t.id}` is not a QuantResult of shape {tuple(W.shape[1:])}"
                    break
            if bad:
                break
    if bad:
        raise MoedslError(f"solver `{solver.name}` ({problem.where}): {bad}")
