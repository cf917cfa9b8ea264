"""Quantizing one decoder layer by its plan: stages in order, then a replay with native routing.

For each stage: one forward of the layer over the calibration batches with hooks at the
stage's capture points, stopped as soon as every capture has fired (the statistics:
moedsl/execute/statistics.py); then GPTQ for the stage's targets, grouped by statistics key
(here); then the quantized weights are written back, so later stages (and the next layer) see
quantized upstream weights, and handed on (`sink`: the packer) as stacks of every expert of a
solve chunk.

A solver that asks for cross statistics (GPTAQ) gets a second activation stream: the
full-precision model's inputs to the layer (`fp_inputs`). A copy of the layer with its weights
as loaded runs on them: in each stage's statistics pass (the cross term, statistics.py) and
after the stages, to produce the full-precision model's inputs to the next layer.

The work of a layer comes in units fixed by the plan (moedsl/execute/units.py): one per linear
statistics key, one per fixed block of a MoE module's experts for each expert key. Under several ranks
(moedsl/execute/distributed.py) each unit is solved by its owner, its weights are broadcast to every
rank after its stage, and its packed tensors and reports go to rank 0 in unit order; one rank owns them
all and does the same work.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.execute import distributed
from moedsl.execute.expert_calls import ChunkedExperts
from moedsl.execute.phases import NO_PHASES
from moedsl.execute.statistics import LayerStatistics, StopForward, _expert_bound
from moedsl.execute.units import gather_reports, plan_units, share_weights
from moedsl.experts import weights as expert_weights
from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack, rtn_quantize
from moedsl.lang.ckpt_name import expand
from moedsl.plan.schema import KindPlan, Policy, Stage, StatsKey, Target
from moedsl.precision import tf32
from moedsl.solvers import Problem, Solver, check_results

__all__ = ["LayerQuantizer", "LayerResult", "Quantized", "StageReport", "StopForward", "TargetReport", "output_error"]


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


@dataclass
class StageReport:
    index: int
    seconds: float
    error: float
    rtn_error: float
    targets: list[TargetReport]


@dataclass
class LayerResult:
    quantized: list[Quantized]
    stages: list[StageReport]
    outputs: list[torch.Tensor]
    carried: list[tuple]  # per batch: the layer's extra outputs, for the next layer (`carry`)
    starved: dict[str, list[int]]  # experts path -> experts that saw no token (after the policy)
    fp_outputs: list[torch.Tensor] | None = None  # the full-precision stream's, when the solver asks for it
    fp_carried: list[tuple] | None = None


class LayerQuantizer(LayerStatistics):
    def __init__(self, kind: KindPlan, layer: nn.Module, cfg: QuantConfig, policy: Policy, device: torch.device,
                 chunk_bytes: int | None = None, batched: bool = True, measure_error: bool = True,
                 solver: Solver | None = None, index: int | None = None,
                 ranks: distributed.Ranks = distributed.SINGLE, expert_blocks: int = 1):
        """batched=False is the reference path: one expert at a time, one solve per matrix.
        solver: what quantizes each target (moedsl/solvers; GPTQ by default); index: the layer, for messages.
        ranks: this process among the run's ranks; expert_blocks: the fixed blocks of each MoE module's experts
        (the unit of ownership; the result depends on it, never on the number of ranks).
        chunk_bytes (default: from the whole layer, `default_chunk_bytes`) bounds every solve and statistics
        chunk inside an expert block: the same on every rank, whatever their number."""
        from moedsl.solvers.gptq import GPTQ

        self.solver = solver if solver is not None else GPTQ()
        self.index = index
        self.batched = batched
        self.measure_error = measure_error
        self.stop_early = True  # stop each stage's forward once its captures fired (tests turn it off)
        self.skipped_expert_calls = 0  # routed experts' forwards skipped: only shared experts remained (expert_calls.py)
        self.replay_split_calls = 0  # replayed experts' calls run in token chunks (expert_calls.py)
        self.out_device = device  # where the replay leaves the next layer's inputs (the CPU when they don't fit)
        self.kind = kind
        self.layer = layer
        self.cfg = cfg
        self.policy = policy
        self.device = device
        self.chunk_bytes = chunk_bytes if chunk_bytes is not None else default_chunk_bytes(layer)
        self.routed_counts: dict[str, torch.Tensor] = {}  # experts path -> tokens per expert (gate/up stage)
        self.starved: dict[str, list[int]] = {}
        self.sink = None  # called with each Quantized as soon as it exists (the packer); else kept in the result
        self.phases = NO_PHASES  # phase timers of the run (moedsl/execute/phases.py)
        self.fp_layer: nn.Module | None = None  # the layer as loaded, while a cross-statistics run needs it
        self.ranks = ranks
        self.units = plan_units(kind, ranks, expert_blocks)
        self._blocks: dict[str, dict[int, tuple[int, int]]] = {}  # experts path -> owned blocks
        for u in self.units:
            if u.block is not None and u.owner == ranks.rank:
                self._blocks.setdefault(u.path, {})[u.block_index] = u.block
        self.unit_reports: dict[int, list[TargetReport]] = {}
        self._unit = 0  # the unit being solved (its Quantized are tagged with it)

    # -- ownership ---------------------------------------------------------------------------

    def owns_key(self, stage: Stage, key: str) -> bool:
        return any(u.stage == stage.index and u.key == key and u.owner == self.ranks.rank for u in self.units)

    def owned_blocks(self, path: str) -> dict[int, tuple[int, int]]:
        """The expert blocks of experts module (or grouped container) `path` this rank owns: index -> (start, stop)."""
        return self._blocks.get(path, {})

    # -- the whole layer ---------------------------------------------------------------------

    def run(self, inputs: list[torch.Tensor], kwargs: list[dict], fp_inputs: list[torch.Tensor] | None = None,
            fp_kwargs: list[dict] | None = None) -> LayerResult:
        """fp_inputs/fp_kwargs: the full-precision stream (cross statistics), or None."""
        quantized: list[Quantized] = []
        seconds: dict[int, float] = {}
        if fp_inputs is not None:
            self.fp_layer = copy.deepcopy(self.layer)  # before any stage writes quantized weights back
        try:
            for stage in self.kind.stages:
                t0 = time.perf_counter()
                with self.phases("statistics", peak=f"statistics.{stage.index}"):
                    hessians = self.collect(stage, inputs, kwargs, fp_inputs)
                with self.phases("solve", peak=f"solve.{stage.index}"):
                    self.solve(stage, hessians, quantized)
                del hessians
                distributed.test_fault(self.ranks.rank, f"layer:{self.index}:solved")
                if self.ranks.distributed:
                    with self.phases("share_weights"):
                        share_weights(self, stage)
                seconds[stage.index] = time.perf_counter() - t0
            with self.phases("replay"):
                outputs, carried = self.replay(inputs, kwargs)
                fp_outputs = fp_carried = None
                if fp_inputs is not None:
                    fp_outputs, fp_carried = self.replay(fp_inputs, fp_kwargs or kwargs, self.fp_layer)
        finally:
            self.fp_layer = None
        stages, starved = gather_reports(self, seconds)
        return LayerResult(quantized, stages, outputs, carried, starved, fp_outputs, fp_carried)

    def emit(self, q: Quantized, out: list[Quantized]) -> None:
        q.unit = self._unit
        if self.sink is None:
            out.append(q)
        else:
            self.sink(q)

    @torch.no_grad()
    def replay(self, inputs: list[torch.Tensor], kwargs: list[dict],
               layer: nn.Module | None = None) -> tuple[list[torch.Tensor], list[tuple]]:
        """The quantized layer (or `layer`) with native routing: next layer's inputs, and any extra outputs it
        carries. Under several ranks batch b is replayed by rank b mod N and broadcast to every rank."""
        layer = self.layer if layer is None else layer
        outs: list = [None] * len(inputs)
        carried: list = [()] * len(inputs)
        with ChunkedExperts(layer, self.kind.moe, self.chunk_bytes) as chunked:
            for b, (x, kw) in enumerate(zip(inputs, kwargs)):
                if self.ranks.owner(b) != self.ranks.rank:
                    continue
                y = layer(x.to(self.device), **kw)
                outs[b] = (y[0] if isinstance(y, tuple) else y).to(self.out_device)
                carried[b] = tuple(y[1:]) if isinstance(y, tuple) else ()
        self.replay_split_calls += chunked.split_calls
        if self.ranks.distributed:
            distributed.share_batches(self.ranks, outs, carried, self.out_device, self.device,
                                      f"sharing layer {self.index}'s outputs")
        return outs, carried

    # -- solving -----------------------------------------------------------------------------

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


def default_chunk_bytes(layer: nn.Module) -> int:
    """The memory bound of one solve, statistics or replay chunk: a quarter of the layer's own weights,
    between 2 and 8 GiB. Larger chunks mean fewer, larger products and kernel launches (a DeepSeek-V3
    layer's gate/up solve in 1 GiB chunks was 256 solves of one expert each); the layer's weights
    are on the device anyway, so the peak grows by at most a quarter of them."""
    size = sum(p.numel() * p.element_size() for p in layer.parameters())
    return int(min(8 << 30, max(2 << 30, size // 4)))


def _experts_path(t: Target) -> str:
    return t.path.split(".{e}.")[0]


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared output error per matrix, tr(ΔW H ΔWᵀ)/2 (H = 2/n Σxxᵀ), for GPTQ's Q and for RTN.

    W, Q [n, out, in]; H [n or 1, in, in]. RTN is row-wise, so all n matrices are one call.
    A figure for the report, not an input to any weight: on CUDA its products run in TF32, which
    changes it in about the fourth digit and makes it several times cheaper."""
    rtn = rtn_quantize(W.reshape(-1, W.shape[-1]), cfg).weight.reshape(W.shape)
    out = []
    with tf32(True):
        for Qx in (Q, rtn):
            d = (W - Qx.to(W.device)).float()
            out.append(((d @ H) * d).sum(dim=(1, 2)) / 2)
    return out[0], out[1]
