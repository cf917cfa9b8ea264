"""Experts written under an engine's stacked names (gpt_oss for vLLM: `experts.<e>.w13_*`, `w2_*`).

Sits between the quantizer and the packer. The quantizer hands on each expert role separately
(gate, up, down of a chunk of experts); where the engine maps a family's experts only as one
gate+up matrix per expert (`engines.StackedExperts`), gate waits here for up of the same experts,
and the pair goes on as one stack with the rows combined as the engine reads them, renamed `w13`;
down goes on renamed `w2`. Everything else passes through unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moedsl.errors import MoedslError
from moedsl.execute.solving import Quantized
from moedsl.write.engines import StackedExperts, stack_gate_up


@dataclass
class Stacked:
    """What the packer gets: the matrices, and how their keys join the names (`w13` + `_` + local, or `.`)."""

    q: Quantized
    join: str = "."
    omit: tuple[str, ...] = ()


class ExpertStacker:
    def __init__(self, layout: StackedExperts | None, experts_paths: list[str]):
        """experts_paths: the layer's experts modules relative to the layer (`mlp.experts`)."""
        self.layout = layout
        paths = "|".join(re.escape(p) for p in experts_paths)
        self.pattern = re.compile(rf"^(?:{paths})\.(\d+)\.(gate|up|down)_proj$") if paths and layout else None
        self.waiting: dict[tuple[int, ...], tuple[str, Quantized]] = {}  # experts -> (role, stack) of the first

    def add(self, q: Quantized) -> list[Stacked]:
        if self.pattern is None or not q.expert:
            return [Stacked(q)]
        parsed = [self.pattern.match(c) for c in q.ckpts]
        if not all(parsed):
            return [Stacked(q)]
        roles = {m.group(2) for m in parsed}
        if len(roles) != 1:
            raise MoedslError(f"one stack holds several expert roles ({sorted(roles)}): {q.ckpts[:2]} …", code="write")
        role, experts = roles.pop(), tuple(int(m.group(1)) for m in parsed)
        layout = self.layout
        if role == "down":
            return [Stacked(Quantized([layout.w2.format(e=e) for e in experts], q.stack, True, q.unit), layout.join,
                            layout.omit)]
        first = self.waiting.pop(experts, None)
        if first is None:
            self.waiting[experts] = (role, q)
            return []
        if first[0] == role:
            raise MoedslError(f"experts {list(experts)}: two {role} stacks before the other of gate and up",
                              code="write")
        gate, up = (first[1], q) if role == "up" else (q, first[1])
        stack = stack_gate_up(gate.stack, up.stack, layout.order)
        return [Stacked(Quantized([layout.w13.format(e=e) for e in experts], stack, True, q.unit), layout.join,
                        layout.omit)]

    def finish(self) -> None:
        """A gate without its up (or the reverse) left at the end of a layer is a definition this cannot stack."""
        if self.waiting:
            experts, (_, q) = next(iter(self.waiting.items()))
            raise MoedslError(f"stacked expert names need each expert's gate and up; `{q.ckpts[0]}` (experts "
                              f"{list(experts)[:8]}) came without its partner", code="write")
