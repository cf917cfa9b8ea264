"""GPTQ as a solver: the executor's default (moedsl/gptq/ holds the algorithm itself).

A problem whose matrices share one Hessian (q/k/v; every expert's gate and up under `all`)
is one tall stacked solve: GPTQ treats rows independently once H is fixed, so one Cholesky
and one sweep serve every row. A problem with a Hessian per matrix (routed experts, every
expert's down projection) is one batched solve along the expert axis, each member's gate and
up rows stacked because they share that member's Hessian.

With `act_order` the columns are solved in order of decreasing Hessian diagonal, on both paths;
with `static_groups` as well, the grids are fixed on the original contiguous groups, so g_idx
stays trivial and vLLM's MoE kernels load the result (docs/formats.md).
"""

from __future__ import annotations

import torch

from moedsl.gptq.batched import gptq_quantize_batched, gptq_quantize_shared
from moedsl.gptq.gptq import prepare_hessian
from moedsl.gptq.quantizer import QuantResult, find_params
from moedsl.solvers import Problem


class GPTQ:
    name = "gptq"
    grid = staticmethod(find_params)  # how a group's (scale, zero) is chosen; solvers/mse.py changes it

    def solve(self, problem: Problem) -> list[list[QuantResult]]:
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
