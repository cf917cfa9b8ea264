"""GPTAQ (Li et al., ICML 2025, "asymmetric calibration"; first published as GPTQv2).

GPTQ fits each layer's quantized output to what the *quantized* model feeds it: it minimises
‖Q X̃ − W X̃‖ over the inputs X̃ that the layers quantized before it produce. GPTAQ fits it to
the *full-precision* model's output instead, ‖Q X̃ − W X‖, so a layer also corrects the error
that the layers before it left in its inputs. With

    H = 2/n X̃ᵀX̃                      (GPTQ's Hessian, on the quantized model's inputs)
    D = 2/n (X − X̃)ᵀ X̃                (the cross term: `Problem.cross`, D[a, b] = Σ Δx_a x̃_b)
    U = upper Cholesky factor of H⁻¹   (GPTQ's, with the same damping)

the unconstrained least-squares answer is W + W D H⁻¹ = W + W (D Uᵀ) U. GPTAQ keeps the
strictly upper part of D Uᵀ ("neuron decomposition" with the Cholesky reformulation):

    P = α · triu₁(D Uᵀ) · U            (strictly upper triangular; α = 0.25, the paper's default)

and, in GPTQ's column sweep, adds w_a · P[a, j] to every later column j when column a is
taken. P being strictly upper triangular, that sum never depends on a quantization decision:
column j receives Σ_{a<j} w_a P[a, j] before it is quantized, which is (W P)[:, j]. So GPTAQ is
GPTQ run, with the same H, on the asymmetry-corrected weights

    W' = W + W · P.

That is how this file runs it: one [out, in] × [in, in] product per matrix, then GPTQ's own
stacked and batched paths (act order, static groups, its block kernel) unchanged. α = 0 gives
GPTQ exactly. With act order, P is formed in the solve order, as the reference code does.

The reference code (github.com/Intelligent-Computing-Lab-Yale/GPTAQ) applies w_a with the
column's value at the time it is quantized inside a block, and the block's quantized weights
in the lazy update between blocks, so its result depends on the block size; here w is the
layer's full-precision weight, the W of the objective's W X, and the result does not.
"""

from __future__ import annotations

import dataclasses

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.batched import batched_inverse_hessian_factor
from moedsl.gptq.quantizer import QuantConfig, QuantResult
from moedsl.precision import tf32
from moedsl.solvers import Problem
from moedsl.solvers.gptq import GPTQ
from moedsl.solvers.mse import find_params_mse

ALPHA = 0.25


def asymmetry_corrected(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, cfg: QuantConfig,
                        alpha: float, correction: tuple | None = None) -> torch.Tensor:
    """W' = W + W·P for W [n, out, in] against H, D [1 or n, in, in] (one per matrix, or one for all).

    correction: `asymmetry_correction(H, D, cfg, alpha)`, when the caller corrects more matrices
    against the same H and D in other calls (the chunks of a shared key)."""
    dead, perm, P = correction if correction is not None else asymmetry_correction(H, D, cfg, alpha)
    m = P.shape[0]
    with tf32(False):
        W = W.to(torch.float32, copy=True)
        W.masked_fill_(dead[:, None, :], 0)  # dead inputs, as GPTQ treats them: a zero weight
        if perm is not None:
            W = W[:, :, perm[0]] if m == 1 else W.gather(2, perm[:, None, :].expand(W.shape))
        corrected = W + W @ P
        if perm is not None:
            inv = torch.argsort(perm, dim=1)
            corrected = (corrected[:, :, inv[0]] if m == 1
                         else corrected.gather(2, inv[:, None, :].expand(corrected.shape)))
        return corrected


def asymmetry_correction(H: torch.Tensor, D: torch.Tensor, cfg: QuantConfig, alpha: float):
    """What W' = W + W·P needs from H and D alone: (dead inputs [m, in], the solve order [m, in] or
    None, P [m, in, in] in that order)."""
    with tf32(False):
        H = H.to(torch.float32, copy=True)
        D = D.to(torch.float32, copy=True)
        m, cols = H.shape[0], H.shape[-1]
        # dead inputs, as GPTQ treats them: a unit Hessian entry, no cross term
        dead = H.diagonal(dim1=1, dim2=2) == 0
        H.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1)
        D.masked_fill_(dead[:, None, :], 0)
        perm = None
        if cfg.act_order:  # P in the order the columns are solved (gptq.py sorts the same way)
            perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
            rows_of = perm[:, :, None].expand(m, cols, cols)
            cols_of = perm[:, None, :].expand(m, cols, cols)
            H = H.gather(1, rows_of).gather(2, cols_of)
            D = D.gather(1, rows_of).gather(2, cols_of)
        U, _ = batched_inverse_hessian_factor(H, cfg)
        return dead, perm, alpha * (D @ U.mT).triu_(1) @ U


class GPTAQ(GPTQ):
    """GPTQ on asymmetry-corrected weights; needs the cross statistic (`statistics`)."""

    base_name = "gptaq"
    statistics = ("hessian", "cross")  # the executor then carries the full-precision model's activations too

    def __init__(self, alpha: float = ALPHA, damp: float | None = None):
        self.configure(alpha=alpha, damp=damp)

    def prepare(self, problem: Problem) -> Problem:
        problem = super().prepare(problem)  # the damping first: P is formed with GPTQ's factor of H⁻¹
        if problem.cross is None:
            raise MoedslError(f"solver `{self.name}` ({problem.where}): no cross statistics were collected "
                              "(the executor collects them for solvers whose `statistics` name `cross`)")
        if not self.alpha:
            return problem
        cache = problem.cache if problem.cache is not None else {}  # once per shared key, else per problem
        if "gptaq.correction" not in cache:
            cache["gptaq.correction"] = asymmetry_correction(problem.hessian, problem.cross, problem.cfg, self.alpha)
        weights = tuple(asymmetry_corrected(W, problem.hessian, problem.cross, problem.cfg, self.alpha,
                                            cache["gptaq.correction"]) for W in problem.weights)
        return dataclasses.replace(problem, weights=weights)


class GPTAQMSE(GPTAQ):
    """GPTAQ on the clipping-searched grids of solvers/mse.py."""

    base_name = "gptaq-mse"
    grid = staticmethod(find_params_mse)
