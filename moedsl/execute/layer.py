"""Quantizing one decoder layer by its plan: stages in order, then a replay with native routing.

For each stage: one forward of the layer over the calibration batches with hooks at the
stage's capture points, stopped as soon as every capture has fired (the statistics:
moedsl/execute/statistics.py); then the stage's solves, grouped by statistics key
(moedsl/execute/solving.py), which write the quantized weights back, so later stages (and the next
layer) see quantized upstream weights, and hand them on (`sink`: the packer) as stacks of every
expert of a solve chunk. Then the replay with native routing (the experts in token chunks:
moedsl/execute/expert_calls.py) makes the next layer's inputs.

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
from dataclasses import dataclass

import torch
from torch import nn

from moedsl.execute import distributed
from moedsl.execute.expert_calls import ChunkedExperts
from moedsl.execute.phases import NO_PHASES
from moedsl.execute.solving import LayerSolving, Quantized, TargetReport
from moedsl.execute.statistics import LayerStatistics, StopForward
from moedsl.execute.units import gather_reports, plan_units, share_weights
from moedsl.gptq.quantizer import QuantConfig
from moedsl.plan.schema import KindPlan, Policy, Stage
from moedsl.solvers import Solver

__all__ = ["LayerQuantizer", "LayerResult", "StageReport", "StopForward"]


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


class LayerQuantizer(LayerStatistics, LayerSolving):
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
        self.skipped_expert_calls = 0  # routed experts' forwards skipped, only shared experts left (expert_calls.py)
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

def default_chunk_bytes(layer: nn.Module) -> int:
    """The memory bound of one solve, statistics or replay chunk: half of the layer's own weights,
    between 2 and 12 GiB. Larger chunks mean fewer, larger products and kernel launches, and more rows
    for each launch of GPTQ's block kernel to hide its latency with: on an H200 a DeepSeek-V3 layer
    took 8.19 s with a quarter of its weights (5.4 GiB chunks of 6 experts' gate and up) and 7.71 s
    with 11 GiB (docs/benchmarks.md). The layer's weights are on the device anyway, so the peak grows
    by about half of them (36.7 → 42.6 GiB there); a small layer (Qwen3-30B-A3B's 1.1 GiB,
    GLM-4.5-Air's 4.2 GiB) keeps about the 2 GiB floor."""
    size = sum(p.numel() * p.element_size() for p in layer.parameters())
    return int(min(12 << 30, max(2 << 30, size // 2)))
