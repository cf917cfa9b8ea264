"""GPTQ as a solver: the executor's default (moedsl/gptq/ holds the algorithm itself).

A problem whose matrices share one Hessian (q/k/v; every expert's gate and up under `all`)
is one tall stacked solve: GPTQ treats rows independently once H is fixed, so one Cholesky
and one sweep serve every row. A problem with a Hessian per matrix (routed experts, every
expert's down projection) is one batched solve along the expert axis, each member's gate and
up rows stacked because they share that member's Hessian.

With `act_order` the columns are solved in order of decreasing Hessian diagonal, on both paths;
with `static_groups` as well, the grids are fixed on the original contiguous groups, so g_idx
stays trivial and vLLM's MoE kernels load the result (docs/formats.md).

The solvers beside this one are GPTQ with one of its three steps changed, which is why they
compose (`gptaq-mse-cd(alpha=0.5)` is all three):

    prepare   the problem GPTQ is run on: the damping (`damp=`, every GPTQ-family solver);
              gptaq.py: the asymmetry-corrected weights
    grid      how a group's (scale, zero) is chosen: min/max here; mse.py: a clipping search
    polish    what follows the solve, given the weights GPTQ was run on: nothing here;
              refit.py: each group's scale (and zero) refitted to the codes;
              descent.py: coordinate descent on the codes, alternated with the refit
"""

from __future__ import annotations

import dataclasses

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.batched import gptq_quantize_batched, gptq_quantize_shared
from moedsl.gptq.gptq import prepare_hessian
from moedsl.gptq.quantizer import QuantResult, find_params
from moedsl.solvers import Problem

# a solver's options, as `name(option=value, ...)` spells them, and their defaults: an option at its
# default is left out of the name, so `gptaq(alpha=0.25)` is `gptaq`
DEFAULTS = {"alpha": 0.25, "damp": None, "sweeps": 2}


class GPTQ:
    base_name = "gptq"
    grid = staticmethod(find_params)  # how a group's (scale, zero) is chosen; solvers/mse.py changes it

    def __init__(self, damp: float | None = None):
        self.configure(damp=damp)

    def configure(self, **options) -> None:
        """Check and keep the options; the name records those that differ from their defaults."""
        for key, value in options.items():
            if value is None:
                continue
            value = float(value)
            if key in ("alpha", "damp") and not 0.0 <= value <= 1.0:
                raise MoedslError(f"{self.base_name}: {key} must be in [0, 1], got {value:g}")
            if key == "sweeps" and (value != int(value) or not 1 <= value <= 100):
                raise MoedslError(f"{self.base_name}: sweeps must be a whole number from 1 to 100, got {value:g}")
            options[key] = int(value) if key == "sweeps" else value
        vars(self).update(options)
        shown = [f"{k}={v:g}" for k, v in options.items() if v != DEFAULTS[k]]
        self.name = f"{self.base_name}({','.join(shown)})" if shown else self.base_name

    def solve(self, problem: Problem) -> list[list[QuantResult]]:
        problem = self.prepare(problem)
        return self.polish(problem, self.quantize(problem))

    def prepare(self, problem: Problem) -> Problem:
        """The problem GPTQ solves: here, the run's with this solver's damping, if it sets one."""
        if self.damp is None or self.damp == problem.cfg.damp_percent:
            return problem
        return dataclasses.replace(problem, cfg=problem.cfg.model_copy(update={"damp_percent": self.damp}))

    def polish(self, problem: Problem, results: list[list[QuantResult]]) -> list[list[QuantResult]]:
        """What follows the solve; `problem.weights` are the weights GPTQ was run on."""
        return results

    def quantize(self, problem: Problem) -> list[list[QuantResult]]:
        n, cfg = problem.n, problem.cfg
        if problem.shared:
            prepared = None
            if problem.cache is not None:  # later chunks of this key reuse the first chunk's factorization
                if "gptq.prepared" not in problem.cache:
                    problem.cache["gptq.prepared"] = prepare_hessian(problem.hessian[0], cfg)
                prepared = problem.cache["gptq.prepared"]
            parts = gptq_quantize_shared([W[i] for W in problem.weights for i in range(n)], problem.hessian[0], cfg,
                                         self.grid, prepared)
            return [parts[j * n:(j + 1) * n] for j in range(len(problem.weights))]
        stacked = problem.weights[0] if len(problem.weights) == 1 else torch.cat(problem.weights, dim=1)
        solved = gptq_quantize_batched(stacked, problem.hessian, cfg, self.grid)
        return split_rows(solved, [W.shape[1] for W in problem.weights])


def split_rows(results: list[QuantResult], sizes: list[int]) -> list[list[QuantResult]]:
    """Per-matrix results of stacked targets, cut back into [target][matrix] (losses split by rows)."""
    if len(sizes) == 1:
        return [results]
    out: list[list[QuantResult]] = [[] for _ in sizes]
    for r in results:
        start = 0
        for j, n in enumerate(sizes):
            rows = slice(start, start + n)
            out[j].append(QuantResult(weight=r.weight[rows], codes=r.codes[rows], scales=r.scales[rows],
                                      zeros=r.zeros[rows], g_idx=r.g_idx, loss=r.loss * n / r.weight.shape[0],
                                      damp=r.damp))
            start += n
    return out
