"""GPTQ, then coordinate descent on the codes, alternated with the scale refit (QuantEase).

GPTQ takes each column once, in order, and never revisits it: column j's code is chosen before
the columns after it are, so it is not the best code for them. Coordinate descent revisits
every column with all the others fixed (Behdin et al., "QuantEase: Optimization-based
Quantization for Language Models", 2023). For one row and the objective f = (w − Q) H (w − Q)ᵀ,
the best unconstrained value of column j with every other column fixed is

    v_j = Q_j + ((w − Q) H)_j / H_jj,

and since f is a parabola in Q_j, the nearest point of the column's grid to v_j is the best
grid point: each step can only lower f. After column j moves by δ, every other target moves by

    v_k −= δ · H_jk / H_kk        (k ≠ j; v_j itself does not change),

which inside a block of columns is applied column by column and to the rest of the row in one
product per block (GPTQ's lazy batch; inside a block a move reaches the columns still to visit
at once, and the block's visited columns at its end). A sweep visits every column once, starting
from GPTQ's codes on GPTQ's grids; after each sweep the grids are refitted to the new codes
(refit.py), so `sweeps=N` alternates N code sweeps with N scale refits. Each row keeps the result
only where its output error on the undamped H is not larger than GPTQ's.

H is damped as GPTQ damped it. w is the weight GPTQ was run on (GPTAQ's corrected weight for
the gptaq variants: the descent minimises the same objective the solve did).

Cost over the solver it follows, per sweep and matrix: one [rows, in] × [in, in] product's
arithmetic in lazy-batch products, about ten small kernels per column (every matrix of a chunk
at once), and the refit's; memory: about six fp32 copies of a solve chunk's weights.
"""

from __future__ import annotations

import torch

from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack, dequantize_codes, quantize
from moedsl.precision import tf32
from moedsl.solvers import Problem
from moedsl.solvers.gptaq import ALPHA, GPTAQ, GPTAQMSE
from moedsl.solvers.mse import MSE
from moedsl.solvers.refit import Objective, Refit, by_member

SWEEPS = 2


class Descent(Refit):
    """GPTQ, then `sweeps` rounds of (a coordinate-descent sweep over the codes, a scale refit)."""

    base_name = "gptq-cd"

    def __init__(self, damp: float | None = None, sweeps: int = SWEEPS):
        self.configure(damp=damp, sweeps=sweeps)

    def polish(self, problem: Problem, results: list[list[QuantResult]]) -> list[list[QuantResult]]:
        def sweeps(objective: Objective, start: list[QuantResult]) -> list[QuantResult]:
            current = start
            for _ in range(self.sweeps):
                current = objective.refit(descend(objective, current, problem.cfg), problem.cfg)
            return objective.keep_better(start, current)

        return by_member(problem, results, sweeps)


class MSEDescent(MSE, Descent):
    base_name = "mse-cd"


class GPTAQDescent(GPTAQ, Descent):
    base_name = "gptaq-cd"

    def __init__(self, alpha: float = ALPHA, damp: float | None = None, sweeps: int = SWEEPS):
        self.configure(alpha=alpha, damp=damp, sweeps=sweeps)


class GPTAQMSEDescent(GPTAQMSE, Descent):
    base_name = "gptaq-mse-cd"

    def __init__(self, alpha: float = ALPHA, damp: float | None = None, sweeps: int = SWEEPS):
        self.configure(alpha=alpha, damp=damp, sweeps=sweeps)


def descend(objective: Objective, results: list[QuantResult], cfg: QuantConfig) -> list[QuantResult]:
    """One coordinate-descent sweep over the columns, on the results' grids and the damped H."""
    with tf32(False):
        H = objective.damped
        W = objective.W
        stack = QuantStack.of(results)
        codes, scales, zeros, g_idx = stack.codes.float(), stack.scales, stack.zeros.float(), stack.g_idx.long()
        Q = dequantize_codes(codes, scales, zeros, g_idx)
        d = H.diagonal(dim1=1, dim2=2)  # [m, in]
        N = H / d[:, None, :]  # N[j, k] = H_jk / H_kk: how column k's target moves when column j does
        N.diagonal(dim1=1, dim2=2).zero_()
        V = Q + ((W - Q) @ H) / d[:, None, :]  # each column's best value, the others fixed
        n, rows, cols = W.shape
        for i1 in range(0, cols, cfg.block_size):
            i2 = min(i1 + cfg.block_size, cols)
            index = g_idx[:, None, i1:i2].expand(n, rows, i2 - i1)
            S, Z = scales.gather(2, index), zeros.gather(2, index)
            moved = torch.zeros(n, rows, i2 - i1, device=W.device)
            for i in range(i2 - i1):
                j = i1 + i
                code = quantize(V[:, :, j], S[:, :, i], Z[:, :, i], cfg.maxq)
                q = S[:, :, i] * (code - Z[:, :, i])
                moved[:, :, i] = q - Q[:, :, j]
                Q[:, :, j], codes[:, :, j] = q, code
                V[:, :, j + 1:i2] -= moved[:, :, i, None] * N[:, None, j, j + 1:i2]  # the block's columns still to visit
            # the block's moves on every other column: those before it, those after it, and its own columns
            # already visited (what a later column of the block moved), all for the next visit
            V[:, :, :i1] -= moved @ N[:, i1:i2, :i1]
            V[:, :, i2:] -= moved @ N[:, i1:i2, i2:]
            V[:, :, i1:i2] -= moved @ N[:, i1:i2, i1:i2].tril(-1)
        return [QuantResult(weight=Q[i], codes=codes[i].to(torch.uint8), scales=r.scales, zeros=r.zeros,
                            g_idx=r.g_idx, loss=r.loss, damp=r.damp) for i, r in enumerate(results)]
