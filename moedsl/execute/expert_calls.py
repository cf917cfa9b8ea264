"""Two ways moedsl runs a MoE block's routed experts other than as one call of their own forward.

Both put an instance `forward` on the experts module for the length of one pass (nn.Module's call
looks it up before the class's) and take it off afterwards.

**Skipped in a statistics pass that no longer needs them** (`DeadExperts`). A stage's statistics
pass runs the layer only until every capture of the stage has fired (statistics.py). When the
routed experts' hook fires and all that the stage still needs lies in the block's shared experts
(`:moe-share`), the routed experts' own forward is dead work: the shared experts read the block's
input, not the routed output, and the pass stops before the block's output is used. At
GLM-4.5-Air's shape that forward (transformers' grouped expert products on every routed token)
held 6 GiB of intermediates per batch and was the layer's memory peak.

So, for that call only, the experts module returns zeros shaped like its input (what transformers'
expert modules return: one row per token). The skip must not change any statistic, and the shared
experts' reading the block's input is checked, not assumed: a shared module whose input is not
stored in the block input's storage makes the batch run again with the experts computed, and the
rest of the pass computes them too.

**In token chunks during the replay** (`ChunkedExperts`). The replay runs the quantized layer as
the model does, to produce the next layer's inputs, and transformers' expert modules hold several
copies of every routed token's rows at once (gathered inputs, gate/up products, outputs, some in
fp32): about k·(2H + 3I)·4 bytes per token, 6 GiB for a batch of 16,384 tokens at GLM-4.5-Air's
shape, which made the replay the layer's memory peak. A token's output depends on that token's
rows alone, so the call is split along its tokens into chunks of at most `chunk_bytes` of those
copies, each chunk is the module's own forward, and the outputs are concatenated. Only calls
whose arguments are exactly the definition's `call(hidden, index, ...)`, all with one row per
token, are split; any other call runs whole.
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


def _override(module: nn.Module, forward, done: list) -> None:
    """Put `forward` on `module`, remembering the instance forward it had (restored by `_restore`)."""
    done.append((module, module.__dict__.get("forward")))
    module.forward = forward


def _restore(done: list) -> None:
    for module, own in reversed(done):
        if own is None:
            del module.forward
        else:
            module.forward = own
    done.clear()


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
        self._overridden: list = []

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
        computed = experts.forward

        def forward(*args, **kwargs):
            if path in self.skipping:
                self.skipping.discard(path)
                self.skipped_now.add(path)
                self.skipped += 1
                return torch.zeros_like(_first_tensor(args, kwargs))
            return computed(*args, **kwargs)

        _override(experts, forward, self._overridden)

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
        self._handles.clear()
        _restore(self._overridden)


class ChunkedExperts:
    """For the length of a `with`: the routed experts' calls of `kind`'s blocks split into token chunks."""

    def __init__(self, layer: nn.Module, moes: tuple[BoundMoe, ...], chunk_bytes: int) -> None:
        self.layer = layer
        self.moes = moes
        self.chunk_bytes = chunk_bytes
        self.split_calls = 0  # calls that ran in more than one chunk (tests read it)
        self._overridden: list = []

    def __enter__(self) -> "ChunkedExperts":
        for moe in self.moes:
            ex = moe.experts
            if ex.grouped or len(ex.call) < 2 or ex.call[0] != "hidden" or ex.call[1] != "index":
                continue  # grouped containers route themselves; a stacked call is every expert's rows at once
            module = get_path(self.layer, ex.path)
            _override(module, self._chunked(module.forward, ex.hidden_size, ex.intermediate_size, len(ex.call)),
                      self._overridden)
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._overridden)

    def _chunked(self, computed, hidden_size: int, intermediate: int, n_args: int):
        def forward(*args, **kwargs):
            x = args[0] if args else None
            if kwargs or len(args) != n_args or not torch.is_tensor(x) or x.dim() != 2 \
                    or not all(torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == x.shape[0] for a in args):
                return computed(*args, **kwargs)
            tokens, k = x.shape[0], (args[1].shape[-1] if args[1].dim() == 2 else 1)
            step = max(1, self.chunk_bytes // (k * (2 * hidden_size + 3 * intermediate) * 4))
            if tokens <= step:
                return computed(*args)
            parts = []
            for t0 in range(0, tokens, step):
                y = computed(*(a[t0:t0 + step] for a in args))
                if not torch.is_tensor(y) or y.shape[0] != min(step, tokens - t0):
                    return computed(*args)  # not one output row per token: the call runs whole
                parts.append(y)
            self.split_calls += 1
            return torch.cat(parts)

        return forward
