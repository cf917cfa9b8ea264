"""A layer's work cut into units fixed by the plan, each with one owner among the ranks (docs/distributed.md).

One unit per linear statistics key, and one per fixed block of a MoE module's experts for each expert
key (`distributed.expert_blocks`; a `:grouped` container is one block of all its experts). The units,
their order and their blocks depend on the plan and `--expert-blocks` alone; only the owners depend on
the number of ranks. One process owns every unit and does the same work on the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moedsl.bind.binder import get_path
from moedsl.execute import distributed
from moedsl.execute.statistics import _expert_bound
from moedsl.experts import weights as expert_weights
from moedsl.plan.schema import KindPlan, Stage


@dataclass(frozen=True)
class Unit:
    """A piece of a layer's work with one owner: a linear statistics key, or one expert block of an expert key."""

    index: int
    stage: int
    key: str
    owner: int
    block: tuple[int, int] | None = None  # experts [start, stop) of the block
    block_index: int = 0
    path: str | None = None  # the experts module (or `:grouped` container) the block belongs to


def plan_units(kind: KindPlan, ranks: distributed.Ranks, expert_blocks: int) -> list[Unit]:
    """A layer's work units in the order every rank visits them: per stage, per statistics key in the order
    of its first target, and per expert block. Linear keys go round the ranks in turn, as do the blocks of
    each experts module (every rank owns a slice of every MoE layer's experts)."""
    units: list[Unit] = []
    linear = 0
    for stage in kind.stages:
        keys = {k.key: k for k in stage.stats}
        for name in dict.fromkeys(t.stats for t in stage.targets):
            key = keys[name]
            if key.capture.kind == "linear_input":
                units.append(Unit(len(units), stage.index, name, ranks.owner(linear)))
                linear += 1
                continue
            if key.capture.kind == "grouped_input":  # one block; its statistics are applied in the forward
                units.append(Unit(len(units), stage.index, name, 0, (0, key.experts), 0, key.capture.path))
                continue
            E = _expert_bound(kind, key.capture.path).experts.num_experts
            for j, block in enumerate(distributed.expert_blocks(E, expert_blocks)):
                units.append(Unit(len(units), stage.index, name, ranks.owner(j), block, j, key.capture.path))
    return units


def merge_reports(kind: KindPlan, units: list[Unit], by_unit: dict, seconds: dict[int, float]) -> list:
    """Every unit's target reports merged per target, per stage, in unit order (the sums one process makes)."""
    from moedsl.execute.layer import StageReport
    from moedsl.execute.solving import TargetReport

    stages = []
    for stage in kind.stages:
        merged: dict[str, TargetReport] = {}
        for u in units:
            if u.stage != stage.index:
                continue
            for r in by_unit.get(u.index, []):
                m = merged.get(r.id)
                if m is None:
                    merged[r.id] = TargetReport(r.id, r.stage, r.matrices, r.loss, r.error, r.rtn_error,
                                                list(r.tokens), list(r.no_tokens), r.seconds)
                else:
                    m.matrices += r.matrices
                    m.loss += r.loss
                    m.error += r.error
                    m.rtn_error += r.rtn_error
                    m.tokens += r.tokens
                    m.no_tokens += r.no_tokens
                    m.seconds += r.seconds
        reports = list(merged.values())
        stages.append(StageReport(stage.index, seconds[stage.index], sum(r.error for r in reports),
                                  sum(r.rtn_error for r in reports), reports))
    return stages


def gather_reports(q, seconds: dict[int, float]) -> tuple[list, dict[str, list[int]]]:
    """Every unit's reports of layer quantizer `q`, merged per target in unit order, and the experts that saw
    no token (on rank 0; nothing elsewhere)."""
    gathered = q.ranks.gather_objects((q.unit_reports, q.starved), f"gathering layer {q.index}'s reports")
    if gathered is None:
        return [], {}
    by_unit: dict[int, list] = {}
    starved: dict[str, set[int]] = {}
    for reports, rank_starved in gathered:
        by_unit.update(reports)
        for path, experts in rank_starved.items():
            starved.setdefault(path, set()).update(experts)
    return merge_reports(q.kind, q.units, by_unit, seconds), {p: sorted(e) for p, e in starved.items()}


@torch.no_grad()
def share_weights(q, stage: Stage) -> None:
    """Each unit's quantized weights, from its owner to every rank (later stages and the replay read them)."""
    for u in q.units:
        if u.stage != stage.index:
            continue
        what = f"sharing layer {q.index}'s quantized `{u.key}`"
        targets = [t for t in stage.targets if t.stats == u.key]
        if u.block is None:
            for t in targets:
                q.ranks.broadcast(get_path(q.layer, t.path).weight.data, u.owner, what)
            continue
        ex = _expert_bound(q.kind, u.path).experts
        module = get_path(q.layer, ex.path)
        w, _ = expert_weights.read(ex, module)
        e0, e1 = u.block
        for t in targets:
            value = w[t.role][e0:e1].contiguous()  # a copy when the role is a view of a fused tensor
            q.ranks.broadcast(value, u.owner, what)
            if u.owner != q.ranks.rank:
                expert_weights.write(ex, module, t.role, value, slice(e0, e1))
