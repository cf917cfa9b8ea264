"""GPTQ, then each group's scale (and zero) refitted to the codes GPTQ chose.

GPTQ fixes a group's grid before it rounds the group's columns: the min/max (or clipped) range
of the weights as they stood then. Once every code is chosen that grid is no longer the best one
for those codes. With the codes q fixed, a row's output error

    f(s) = (w − Q) H (w − Q)ᵀ,      Q_c = s_g (q_c − z_g) for the columns c of group g,

is a quadratic in the row's G scales, least at the solution of one G × G system

    M s = b,      M[g, h] = a_g H_gh a_hᵀ,      b[g] = a_g (H wᵀ)_g,      a = q − z,

a_g the row's a on group g's columns and H_gh the block of H between groups g and h. The
groups are coupled through H's off-diagonal blocks, so the solve is joint, not group by group.
With an asymmetric grid the zero-points move as well: Q_c = s_g q_c − t_g is linear in (s, t),
one 2G × 2G solve gives t, the zero becomes the integer round(t / s) in [0, maxq] (the formats
store integer zeros), and s is solved again with those zeros fixed.

This is the coefficient step of alternating quantization (least-squares coefficients for fixed
codes; Xu et al., "Alternating Multi-bit Quantization for Recurrent Neural Networks", ICLR 2018),
in GPTQ's H-metric; descent.py alternates it with a re-solve of the codes.

w is the weight GPTQ was run on (for gptaq-refit, GPTAQ's corrected weight: the refit minimises
the same objective as the solve). H is damped as GPTQ damped it (the same λ, so a starved
expert's few tokens cannot make M singular). The refitted scales are rounded to the format's
scale dtype and kept positive, and each row keeps its refit only where its output error on the
undamped H is not larger than before: the polish never makes a row worse on the statistics it
was fitted to. A result's `loss` stays the solve's (GPTQ's objective); the run's report measures
the output error of the weights as returned.

Cost over the solver it follows, per matrix: G products [rows, width] × [width, in] (one
[rows, in] × [in, in] product's arithmetic; twice for an asymmetric grid), two such products for
the comparison, and a G × G solve per row; memory: about five fp32 copies of a solve chunk's
weights.
"""

from __future__ import annotations

import dataclasses

import torch

from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack, dequantize_codes, round_scale
from moedsl.precision import tf32
from moedsl.solvers import Problem
from moedsl.solvers.gptaq import GPTAQ, GPTAQMSE
from moedsl.solvers.gptq import GPTQ, split_rows
from moedsl.solvers.mse import MSE


class Refit(GPTQ):
    """GPTQ, then the scales (and zeros) refitted to its codes."""

    base_name = "gptq-refit"

    def polish(self, problem: Problem, results: list[list[QuantResult]]) -> list[list[QuantResult]]:
        return by_member(problem, results, lambda objective, rs: objective.keep_better(rs, objective.refit(rs, problem.cfg)))


class MSERefit(MSE, Refit):
    base_name = "mse-refit"


class GPTAQRefit(GPTAQ, Refit):
    base_name = "gptaq-refit"


class GPTAQMSERefit(GPTAQMSE, Refit):
    base_name = "gptaq-mse-refit"


def by_member(problem: Problem, results: list[list[QuantResult]], polish) -> list[list[QuantResult]]:
    """polish(Objective, results [n]) once for every target of the problem: the targets share each
    matrix's Hessian (q/k/v, an expert's gate and up), so their rows are stacked, as GPTQ's batched
    solve stacks them, and cut back apart afterwards (each result keeping its target's loss)."""
    sizes = [W.shape[1] for W in problem.weights]
    W = problem.weights[0] if len(sizes) == 1 else torch.cat(problem.weights, dim=1)
    joined = [results[0][i] if len(sizes) == 1 else QuantResult(
        weight=torch.cat([rs[i].weight for rs in results]), codes=torch.cat([rs[i].codes for rs in results]),
        scales=torch.cat([rs[i].scales for rs in results]), zeros=torch.cat([rs[i].zeros for rs in results]),
        g_idx=results[0][i].g_idx, loss=0.0, damp=results[0][i].damp) for i in range(problem.n)]
    polished = polish(Objective(W, problem.hessian, [r.damp for r in joined]), joined)
    return [[dataclasses.replace(r, loss=old.loss) for r, old in zip(rs, olds)]
            for rs, olds in zip(split_rows(polished, sizes), results)]


class Objective:
    """The output error (w − Q) H (w − Q)ᵀ of each row of a stack of matrices, on GPTQ's terms.

    W [n, rows, in] (the weights GPTQ was run on), H [1 or n, in, in], damps: the damp_percent
    GPTQ used for each matrix. Dead inputs (a zero Hessian diagonal) get a unit Hessian entry and
    a zero weight, as GPTQ gives them; `damped` adds GPTQ's λ = damp · mean(diag H)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, damps: list[float]):
        with tf32(False):
            H = H.to(device=W.device, dtype=torch.float32, copy=True)
            dead = H.diagonal(dim1=1, dim2=2) == 0
            H.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1)
            self.W = W.to(torch.float32).masked_fill(dead[:, None, :], 0)
            self.H = H
            damp = torch.tensor(damps[:H.shape[0]], device=H.device, dtype=torch.float32)  # shared H: one λ
            lam = damp * H.diagonal(dim1=1, dim2=2).mean(dim=1)
            self.damped = H + lam[:, None, None] * torch.eye(H.shape[-1], device=H.device)

    def error(self, Q: torch.Tensor) -> torch.Tensor:
        """[n, rows]: each row's (w − q) H (w − q)ᵀ on the undamped H."""
        with tf32(False):
            E = self.W - Q
            return ((E @ self.H) * E).sum(dim=-1)

    def keep_better(self, old: list[QuantResult], new: list[QuantResult]) -> list[QuantResult]:
        """Row by row, `new` where its error is not larger than `old`'s, else `old`."""
        stack = lambda rs, f: torch.stack([getattr(r, f) for r in rs])  # noqa: E731
        better = self.error(stack(new, "weight")) <= self.error(stack(old, "weight"))  # [n, rows]
        return [QuantResult(weight=torch.where(b[:, None], n.weight, o.weight),
                            codes=torch.where(b[:, None], n.codes, o.codes),
                            scales=torch.where(b[:, None], n.scales, o.scales),
                            zeros=torch.where(b[:, None], n.zeros, o.zeros), g_idx=o.g_idx, loss=o.loss, damp=o.damp)
                for b, o, n in zip(better, old, new)]

    def refit(self, results: list[QuantResult], cfg: QuantConfig) -> list[QuantResult]:
        """The least-squares scales (and zeros) for the results' codes, on the damped H."""
        with tf32(False):
            stack = QuantStack.of(results)
            codes, scales, zeros, g_idx = stack.codes.float(), stack.scales, stack.zeros.float(), stack.g_idx.long()
            layout = GroupLayout(g_idx[:1] if self.H.shape[0] == 1 else g_idx, scales.shape[-1])
            H, W, q = layout.hessian(self.damped), layout.columns(self.W), layout.columns(codes)
            ones = layout.columns(torch.ones_like(codes[:, :1]))  # [n or 1, 1, G, w]: the group's real columns
            if not cfg.sym:
                zeros = refit_zeros(q * ones, -ones, H, W, scales, zeros, cfg.maxq)
            a = (q - zeros[..., None]) * ones
            (M,), b = normal_equations(a, [a], H, W)
            new = solve_or_keep(M, b, scales)
            new = round_scale(new, cfg.torch_scale_dtype)
            new = torch.where((new > 0) & torch.isfinite(new), new, scales)
            weight = dequantize_codes(codes, new, zeros, g_idx)
            zeros = zeros.to(torch.int32)
            return [QuantResult(weight=weight[i], codes=r.codes, scales=new[i], zeros=zeros[i], g_idx=r.g_idx,
                                loss=r.loss, damp=r.damp) for i, r in enumerate(results)]


def refit_zeros(u, v, H, W, scales, zeros, maxq: int):
    """Zeros of an asymmetric grid: Q = s·q − t on each group is linear in (s, t); solve for both
    jointly, and take z = round(t / s) in [0, maxq] (the old zero where that fails)."""
    G = scales.shape[-1]
    (Muu, Muv), bu = normal_equations(u, [u, v], H, W)
    (Mvv,), bv = normal_equations(v, [v], H, W)
    M = torch.cat([torch.cat([Muu, Muv], -1), torch.cat([Muv.mT, Mvv.expand_as(Muu)], -1)], -2)
    b = torch.cat([bu, bv.expand_as(bu)], -1)
    x = solve_or_keep(M, b, torch.cat([scales, scales * zeros], -1))
    s, t = x[..., :G], x[..., G:]
    z = torch.round(t / s).clamp(0, maxq)
    return torch.where((s > 0) & torch.isfinite(z), z, zeros)


def normal_equations(X, Ys, H, W):
    """For basis vectors X [n, r, G, w] (one per row and group, zero outside the group's columns),
    the matrices M[g, h] = X_g H_gh Y_hᵀ for each Y in Ys, and b[g] = X_g (H Wᵀ)_g; H [m, G·w, G·w]
    and W [n, rows, G, w] in the same grouped layout. r may be 1 (the same basis for every row)."""
    n, r, G, w = X.shape
    Ms = [torch.empty(n, max(r, Y.shape[1]), G, G, device=X.device) for Y in Ys]
    b = torch.empty(n, max(r, W.shape[1]), G, device=X.device)
    flat = W.flatten(2)
    for g in range(G):
        XH = X[:, :, g] @ H[:, g * w:(g + 1) * w]  # [n, r, G·w]: the group's row of H, weighted by its basis
        for M, Y in zip(Ms, Ys):
            M[:, :, g] = (XH.unflatten(-1, (G, w)) * Y).sum(dim=-1)
        b[:, :, g] = (XH * flat).sum(dim=-1)
    return Ms, b


def solve_or_keep(M: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with M x = b for each row; an unknown whose basis is zero (an empty diagonal: every code of
    the group at its zero) keeps its `keep` value, and so does a row whose system is singular."""
    empty = M.diagonal(dim1=-2, dim2=-1) == 0
    M = M.clone()
    M.diagonal(dim1=-2, dim2=-1).masked_fill_(empty, 1)
    b = torch.where(empty, keep, b)
    x, info = torch.linalg.solve_ex(M, b.unsqueeze(-1))
    x = x.squeeze(-1)
    ok = (info == 0)[..., None] & torch.isfinite(x).all(dim=-1, keepdim=True)
    return torch.where(ok, x, keep)


class GroupLayout:
    """The columns of each member regrouped so that group g holds slots [g·w, (g+1)·w), w the
    largest group: with act order and dynamic groups a group's columns are scattered (g_idx), and
    a ragged last group is padded. Padding slots hold zeros, so they add nothing to any sum."""

    def __init__(self, g_idx: torch.Tensor, groups: int):
        m, cols = g_idx.shape
        counts = torch.zeros(m, groups, dtype=torch.long, device=g_idx.device)
        counts.scatter_add_(1, g_idx, torch.ones_like(g_idx))
        self.groups, self.width = groups, int(counts.max())
        order = torch.argsort(g_idx, dim=1, stable=True)
        group_sorted = g_idx.gather(1, order)
        start = counts.cumsum(1) - counts
        slot_sorted = group_sorted * self.width + torch.arange(cols, device=g_idx.device) - start.gather(1, group_sorted)
        self.slot = torch.empty_like(g_idx).scatter_(1, order, slot_sorted)  # [m, cols]: each column's slot
        self.trivial = groups * self.width == cols and bool(
            (self.slot == torch.arange(cols, device=g_idx.device)).all())

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, r, in] -> [n, r, G, w]."""
        if self.trivial:
            return x.unflatten(-1, (self.groups, self.width))
        out = x.new_zeros(*x.shape[:2], self.groups * self.width)
        out.scatter_(2, self.slot[:, None, :].expand(x.shape[0], x.shape[1], -1), x)
        return out.unflatten(-1, (self.groups, self.width))

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        """H [m, in, in] -> [m, G·w, G·w]."""
        if self.trivial:
            return H
        m, cols, _ = H.shape
        slots = self.groups * self.width
        slot = self.slot.expand(m, cols)
        rows = H.new_zeros(m, slots, cols).scatter_(1, slot[:, :, None].expand(m, cols, cols), H)
        return H.new_zeros(m, slots, slots).scatter_(2, slot[:, None, :].expand(m, slots, cols), rows)
