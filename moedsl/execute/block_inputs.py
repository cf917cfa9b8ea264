"""A stage that reads only inside one MoE block runs that block alone, when the stage before it changed
nothing outside the block: on the block inputs that stage's forward saw, kept for it.

Each stage's statistics come from a forward of the layer, so that later stages see the weights earlier
stages quantized. A MoE layer's last stages, though, often both lie inside the MoE block: the experts'
gate/up, then their down projection (and the shared experts' with them). Quantizing the gate/up changes
nothing that reaches the block's input, so the down stage's forward would recompute the attention and
norms before the block exactly as the gate/up stage computed them: about 35 ms of a 0.6 s Qwen3-30B-A3B
layer, 0.2 s of a DeepSeek-V3 one, at 64 × 2048 tokens. Instead, the earlier stage's forward keeps each
batch's arguments to the block, and the later stage calls the block on them: the very same values reach
every hook (the block's router, experts and shared experts run as in the layer, with the weights quantized
so far), and the forward stops at the last capture as before.

Conditions, all checked here: every target of the earlier stage and every capture and target of the later
one lie inside the same block; no cross statistics (their full-precision stream runs the whole layer);
and the kept inputs fit in the layer's chunk bound (they are as large as the layer's inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.bind.bound import BoundMoe
from moedsl.plan.schema import KindPlan, Stage


def _inside(path: str, block: str) -> bool:
    return path.startswith(block + ".")


def _paths(stage: Stage) -> list[str]:
    """Where a stage's statistics are captured, and its targets (each is hooked, or read at a capture)."""
    return [k.capture.path for k in stage.stats] + [t.path for t in stage.targets]


def block_for_next_stage(kind: KindPlan, stage: Stage) -> tuple[BoundMoe, Stage] | None:
    """The MoE block whose inputs `stage` should keep for the stage after it, and that stage; or None."""
    order = [s.index for s in kind.stages]
    at = order.index(stage.index)
    if at + 1 == len(order):
        return None
    later = kind.stages[at + 1]
    for moe in kind.moe:
        if (stage.targets and all(_inside(t.path, moe.path) for t in stage.targets)
                and all(_inside(p, moe.path) for p in _paths(later))):
            return moe, later
    return None


class BlockInputs:
    """One stage's inputs to one MoE block, batch by batch, for the stage after it."""

    def __init__(self, layer: nn.Module, moe: BoundMoe, later: Stage, batches: int):
        self.module = get_path(layer, moe.path)
        self.stage = later.index  # the stage they are for
        self.batches: list[tuple[tuple, dict] | None] = [None] * batches
        self.calls = [0] * batches  # the block's calls in each batch's forward: one, or nothing is kept
        self.batch = 0  # the batch whose forward runs now

    def start(self, b: int) -> None:
        """Batch b's forward begins (again, when a skip proved unsafe): what an earlier try kept is dropped."""
        self.batch = b
        self.batches[b] = None
        self.calls[b] = 0

    def hook(self) -> torch.utils.hooks.RemovableHandle:
        def keep(mod, args, kwargs):
            # copies: the layer may reuse its buffers once the block has run
            self.batches[self.batch] = (tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()})
            self.calls[self.batch] += 1

        return self.module.register_forward_pre_hook(keep, with_kwargs=True)

    def run(self, b: int) -> None:
        """The block alone on batch b's kept inputs (its hooks fire as in the layer's forward)."""
        args, kwargs = self.batches[b]
        self.module(*args, **kwargs)

    def complete(self, own: list[int]) -> bool:
        """Whether every batch this rank ran called the block exactly once (a block called twice in one forward
        could not be stood in for by one call)."""
        return all(self.calls[b] == 1 for b in own)


def _copy(value):
    return value.detach().clone() if torch.is_tensor(value) else value


def fits(inputs: list[torch.Tensor], bound: int) -> bool:
    """Whether a stage's inputs to a block (as large as the layer's inputs) fit in `bound` bytes."""
    return sum(x.numel() * x.element_size() for x in inputs) <= bound
