"""The solving half of `LayerQuantizer` (moedsl/execute/layer.py): a stage's statistics in, its
targets' quantized weights out.

Each work unit of the stage that this rank owns is solved in unit order (moedsl/execute/units.py):
a linear statistics key solves its linears against their one Hessian; an expert block solves its
experts in chunks bounded by `chunk_bytes` (fp32 copies of all of them at once would be the layer's
peak): under `all` a chunk's gate and up rows are one tall matrix against the one shared Hessian,
otherwise each expert has its Hessian and the chunk is one batched solve. The quantized weights are
written back into the layer (later stages and the replay read them) and handed on as `Quantized`
stacks (`emit`: to the packer), with a `TargetReport` per target: the solver's loss and the output
error of GPTQ and of round-to-nearest, measured here rather than taken from the solver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moedsl.bind.binder import get_path
from moedsl.execute.statistics import _expert_bound
from moedsl.experts import weights as expert_weights
from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack, rtn_weight
from moedsl.lang.ckpt_name import expand
from moedsl.plan.schema import Stage, StatsKey, Target
from moedsl.solvers import Problem, check_results


@dataclass
class Quantized:
    """Quantized matrices ready for the packer: one linear, or the experts of a solve chunk, stacked
    (on the device that solved them)."""

    ckpts: list[str]  # checkpoint names relative to the layer, one per matrix of the stack
    stack: QuantStack
    expert: bool
    unit: int = 0  # the work unit that made it (moedsl/execute/units.py): the checkpoint keeps unit order


@dataclass
class TargetReport:
    id: str
    stage: int
    matrices: int
    loss: float  # GPTQ objective, summed over matrices
    error: float  # mean squared output error tr(ΔW H ΔWᵀ)/2, summed over matrices
    rtn_error: float  # the same for round-to-nearest at the same bits and group size
    tokens: list[int]  # tokens seen (per expert for expert targets)
    no_tokens: list[int] = field(default_factory=list)  # experts that saw no calibration token
    seconds: float = 0.0


class LayerSolving:
    """The solving half of `LayerQuantizer`, which sets the attributes used here: layer, kind, cfg,
    device, chunk_bytes, batched, measure_error, solver, index, ranks, units, unit_reports, starved,
    and `emit`."""

    @torch.no_grad()
    def solve(self, stage: Stage, hessians: dict, out: list[Quantized]) -> None:
        """The stage's units this rank owns, in unit order; their reports go to `unit_reports`."""
        by_key = {k.key: k for k in stage.stats}
        # a key that every block of its experts shares: finalized once, and what the solver derives from it
        # (`Problem.cache`) kept across the blocks, as across the chunks of one block
        shared: dict[str, tuple] = {}
        for u in self.units:
            if u.stage != stage.index or u.owner != self.ranks.rank:
                continue
            t0 = time.perf_counter()
            targets = [t for t in stage.targets if t.stats == u.key]
            key = by_key[u.key]
            hess = hessians[u.key]
            self._unit = u.index
            if u.block is None:
                H, D = hess.finalize(), hess.finalize_cross()
                reports = self.solve_linears(stage, targets, H, int(hess.count), out, D)
            elif key.per_expert:
                part = hess.parts[u.block_index]
                reports = self.solve_experts(stage, targets, key, part.finalize(), part.count, out,
                                             part.finalize_cross(), u.block)
            else:
                if u.key not in shared:
                    shared[u.key] = (hess.finalize(), hess.finalize_cross(), {})
                H, D, cache = shared[u.key]
                reports = self.solve_experts(stage, targets, key, H, hess.count, out, D, u.block, cache)
            spent = time.perf_counter() - t0
            for r in reports:
                r.seconds = spent / len(targets)
            self.unit_reports[u.index] = reports

    def solve_linears(self, stage: Stage, targets: list[Target], H: torch.Tensor, tokens: int,
                      out: list[Quantized], D: torch.Tensor | None = None) -> list[TargetReport]:
        modules = [get_path(self.layer, t.path) for t in targets]
        Ws = [m.weight.detach().to(self.device, torch.float32, copy=True) for m in modules]
        problem = Problem(tuple(W[None] for W in Ws), H[None], tuple(targets), (), (tokens,), self.cfg,
                          self.index, self._where(targets), None if D is None else D[None])
        results = [r[0] for r in self._solve(problem)]
        reports = []
        for t, m, W, r in zip(targets, modules, Ws, results):
            m.weight.data.copy_(r.weight.to(m.weight.dtype))
            err, rtn = (output_error(W[None], r.weight[None], H, self.cfg) if self.measure_error
                        else (torch.zeros(1), torch.zeros(1)))
            reports.append(TargetReport(t.id, stage.index, 1, r.loss, float(err.sum()), float(rtn.sum()), [tokens]))
            bias = m.bias.detach()[None] if m.bias is not None else None
            self.emit(Quantized([t.ckpt], QuantStack.of([r], bias), False), out)
        return reports

    def solve_experts(self, stage: Stage, targets: list[Target], key: StatsKey, H: torch.Tensor, counts: torch.Tensor,
                      out: list[Quantized], D: torch.Tensor | None, block: tuple[int, int],
                      cache: dict | None = None) -> list[TargetReport]:
        """One role per target (or one `:grouped` container), the experts of one block [start, stop) (H, D,
        counts: the block's, or the one shared Hessian; cache: what the solver derived from that one).
        Experts are taken in chunks (fp32 copies of all of them at once would be the peak of the layer):
        under `all` a chunk's gate and up rows are one tall matrix against the one shared Hessian;
        otherwise each expert has its Hessian and the chunk is one batched solve. The unbatched reference
        path solves one matrix at a time."""
        first = targets[0]
        if first.kind == "grouped":  # one container, its [E, out, in] weight: no roles, no bias
            owner, container = first.path, get_path(self.layer, first.path)
            w, b = {None: container.weight}, {}

            def write(t: Target, Q: torch.Tensor, experts: slice) -> None:
                container.weight.data[experts] = Q.to(container.weight.dtype)
        else:
            ex = _expert_bound(self.kind, first.path if first.kind == "fused" else _experts_path(first)).experts
            owner, module = ex.path, get_path(self.layer, ex.path)
            w, b = expert_weights.read(ex, module)

            def write(t: Target, Q: torch.Tensor, experts: slice) -> None:
                expert_weights.write(ex, module, t.role, Q, experts)
        start, stop = block
        E, cols = stop - start, w[first.role].shape[2]
        no_tokens: list[int] = []
        if key.per_expert:
            starved = counts == 0
            no_tokens = [start + e for e in starved.nonzero().flatten().tolist()]
            if no_tokens:
                # an expert that saw no token has no statistics: an identity Hessian makes GPTQ round to nearest
                H = torch.where(starved[:, None, None], torch.eye(cols, device=H.device), H)
                if D is not None:
                    D = torch.where(starved[:, None, None], torch.zeros((), device=D.device), D)
                self.starved[owner] = sorted(set(self.starved.get(owner, [])) | set(no_tokens))
        rows = sum(w[t.role].shape[1] for t in targets)
        step = max(1, min(E, self.chunk_bytes // (rows * cols * 4 * 8))) if self.batched else 1
        acc = {t.id: [0.0, torch.zeros((), dtype=torch.float64, device=self.device),
                      torch.zeros((), dtype=torch.float64, device=self.device)]
               for t in targets}  # loss, error, RTN error (the errors summed on the device: no sync per chunk)
        # what the solver derives from the one Hessian every chunk reads (per-expert Hessians differ by chunk)
        cache = None if key.per_expert else ({} if cache is None else cache)
        for c0 in range(0, E, step):
            c1 = min(E, c0 + step)
            e0, e1 = start + c0, start + c1  # the chunk's experts
            Wc = [w[t.role][e0:e1].detach().to(self.device, torch.float32, copy=True) for t in targets]
            Hc = H[c0:c1] if key.per_expert else H[None]
            Dc = None if D is None else D[c0:c1] if key.per_expert else D[None]
            tokens = tuple(counts[c0:c1].tolist()) if key.per_expert else (int(counts),)
            results = self.solve_chunk(Problem(tuple(Wc), Hc, tuple(targets), tuple(range(e0, e1)), tokens, self.cfg,
                                               self.index, self._where(targets), cross=Dc,
                                               cache=cache))  # [target][expert in chunk]
            for t, W, res in zip(targets, Wc, results):
                Q = torch.stack([r.weight for r in res])
                write(t, Q, slice(e0, e1))
                if self.measure_error:
                    err, rtn = output_error(W, Q, Hc, self.cfg)
                    acc[t.id][1] += err.sum()
                    acc[t.id][2] += rtn.sum()
                acc[t.id][0] += sum(r.loss for r in res)
                bias = b.get(t.role)
                stack = QuantStack.of(res, bias[e0:e1].detach() if bias is not None else None)
                self.emit(Quantized([expand(t.ckpt, e) for e in range(e0, e1)], stack, True), out)
            del Wc, results
        tokens = counts.tolist() if key.per_expert else [int(counts)] * E
        return [TargetReport(t.id, stage.index, E, acc[t.id][0], float(acc[t.id][1]), float(acc[t.id][2]), tokens,
                             no_tokens) for t in targets]

    def solve_chunk(self, problem: Problem) -> list[list[QuantResult]]:
        if self.batched or problem.n == 1:
            return self._solve(problem)
        # the reference path: one matrix at a time
        def one(t: torch.Tensor | None, i: int):
            return t if t is None or problem.shared else t[i:i + 1]

        parts = [self._solve(Problem(tuple(W[i:i + 1] for W in problem.weights), one(problem.hessian, i),
                                     problem.targets, problem.experts[i:i + 1],
                                     problem.tokens[i:i + 1] if not problem.shared else problem.tokens,
                                     problem.cfg, problem.layer, problem.where, one(problem.cross, i)))
                 for i in range(problem.n)]
        return [[part[j][0] for part in parts] for j in range(len(problem.weights))]

    def _solve(self, problem: Problem) -> list[list[QuantResult]]:
        results = self.solver.solve(problem)
        check_results(self.solver, problem, results)
        return results

    def _where(self, targets: list[Target]) -> str:
        names = ", ".join(t.id for t in targets)
        return f"layer {self.index} {names}" if self.index is not None else names


def _experts_path(t: Target) -> str:
    return t.path.split(".{e}.")[0]


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared output error per matrix, tr(ΔW H ΔWᵀ)/2 (H = 2/n Σxxᵀ), for GPTQ's Q and for RTN.

    W, Q [n, out, in]; H [n or 1, in, in]. RTN is row-wise, so all n matrices are one call.
    A figure for the report, not an input to any weight. On CUDA its products run on bf16 tensor
    cores, with fp32 accumulation and an fp32 sum: the roundings of ΔW, H and the products are
    unbiased and average out over the matrix, so the figure moves in about the fourth digit, at
    half the cost of TF32 (at DeepSeek-V3's gate/up, 2 × 10¹⁴ FLOP per layer). On the CPU, fp32."""
    rtn = rtn_weight(W.reshape(-1, W.shape[-1]), cfg).reshape(W.shape)
    dtype = torch.bfloat16 if W.device.type == "cuda" else torch.float32
    Hx = H.to(dtype)
    out = []
    for Qx in (Q, rtn):
        d = (W - Qx.to(W.device)).to(dtype)
        out.append(torch.matmul(d, Hx).mul_(d).sum(dim=(1, 2), dtype=torch.float32) / 2)
    return out[0], out[1]
