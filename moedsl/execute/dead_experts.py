"""Skipping the routed experts' forward in a statistics pass that no longer needs it.

A stage's statistics pass runs the layer only until every capture of the stage has fired
(statistics.py). When the routed experts' hook fires and all that the stage still needs lies in
the block's shared experts (`:moe-share`), the routed experts' own forward is dead work: the shared
experts read the block's input, not the routed output, and the pass stops before the block's output
is used. At GLM-4.5-Air's shape that forward (transformers' grouped expert products on every routed
token) held 6 GiB of intermediates per batch and was the layer's memory peak.

So, for that call only, the experts module returns zeros shaped like its input (what transformers'
expert modules return: one row per token). The skip must not change any statistic, and the shared
experts' reading the block's input is checked, not assumed: a shared module whose input is not
stored in the block input's storage makes the batch run again with the experts computed, and the
rest of the pass computes them too.
"""

from __future__ import annotations

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.bind.bound import BoundMoe


class SharedReadsRoutedOutput(Exception):
    """A shared expert's input was not the block's input while the routed experts were skipped."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class DeadExperts:
    """The routed experts of the stage's MoE blocks, each skippable while only its shared experts remain."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.enabled = True  # off for the rest of the pass once a shared expert read something else
        self.skipping: set[str] = set()  # experts paths whose next call returns zeros
        self.skipped_now: set[str] = set()  # experts paths that returned zeros in this batch's forward
        self.skipped = 0  # calls skipped in this pass (tests read it)
        self._block_storage: dict[str, int] = {}
        self._handles: list = []
        self._overridden: list[tuple[nn.Module, object]] = []  # module, the instance forward it had (or None)

    def install(self, moe: BoundMoe, experts: nn.Module) -> None:
        """Hooks for one block: its input's storage, its shared modules' check, and the experts' forward."""
        if not moe.shared:
            return
        path = moe.experts.path

        def block_hook(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                self._block_storage[path] = _storage(x)

        def shared_hook(mod, args, kwargs):
            if path in self.skipped_now:
                x = _first_tensor(args, kwargs)
                if x is None or _storage(x) != self._block_storage.get(path):
                    raise SharedReadsRoutedOutput(path)

        self._handles.append(get_path(self.layer, moe.path).register_forward_pre_hook(block_hook, with_kwargs=True))
        for share in moe.shared:
            self._handles.append(get_path(self.layer, share).register_forward_pre_hook(shared_hook, with_kwargs=True))
        own = experts.__dict__.get("forward")  # an instance forward set by someone else, restored afterwards
        computed = experts.forward

        def forward(*args, **kwargs):
            if path in self.skipping:
                self.skipping.discard(path)
                self.skipped_now.add(path)
                self.skipped += 1
                return torch.zeros_like(_first_tensor(args, kwargs))
            return computed(*args, **kwargs)

        experts.forward = forward  # an instance attribute: nn.Module's call looks it up before the class's
        self._overridden.append((experts, own))

    def consider(self, moe: BoundMoe, remaining: set[str]) -> None:
        """Called by the experts' hook once they have fired: skip their forward if only shared paths remain."""
        if not self.enabled or not moe.shared or not remaining:
            return
        if all(any(p == s or p.startswith(s + ".") for s in moe.shared) for p in remaining):
            self.skipping.add(moe.experts.path)

    def start_batch(self) -> None:
        self.skipping.clear()
        self.skipped_now.clear()
        self._block_storage.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for m, own in self._overridden:
            if own is None:
                del m.forward
            else:
                m.forward = own
        self._handles.clear()
        self._overridden.clear()
