"""The writer stage: finished layers to disk behind the quantizer — shard, then resume state.

For each `FinishedLayer` (plain data from the run loop): the packed modules (waiting for their
copies from the device), the layer's unquantized tensors copied from the source shards, the
layer's shard (`CheckpointWriter.flush_shard`: a hidden temporary, fsynced, renamed), then
the resume state (`OutputDir.commit_layer`): the next layer's inputs as `acts-NNNNN.safetensors`
(temporary, renamed) and `state.json` naming them (temporary, renamed), written last — after
every layer with `--resume-interval 0`, else after the first layer that ends at least that many
seconds after the last record (a layer's activations are as large as its shard: writing them
for every fast layer doubled the disk traffic). A run killed at any moment finds either the old
state (the layers since are redone and their shards rewritten byte for byte) or the new one,
each pointing at inputs that were completely written. One layer near the end also carries the
tensors outside the decoder layers, written into their own shard after its resume state.

Overlapping (`overlap=True`), a background thread writes layer i−1 while layer i is quantized;
`submit` first waits for the previous layer, so at most one layer is being written and host
memory holds at most one layer's packed tensors and activations. Step by step, `submit` writes
at once. Both write the same bytes. An error in the background is raised by the next
`submit` or by `drain`.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from moedsl.execute.packer import Packed
from moedsl.execute.phases import NO_PHASES
from moedsl.write.checkpoint import CheckpointWriter

@dataclass
class FinishedLayer:
    index: int
    shard: str  # file name of the layer's shard
    packed: list[Packed]  # its quantized modules, from the packer
    copies: list[str]  # its checkpoint keys stored unchanged (norms, routers, …)
    # the next layer's inputs (and carried state), on any device (see `HostCopier`), for the resume state;
    # None: no resume state after this layer (--resume-interval)
    acts: dict[str, torch.Tensor] | None
    state: dict = field(default_factory=dict)  # state.json once this layer is on disk (without `acts`)
    acts_ready: torch.cuda.Event | None = None  # when `acts` are host copies still being filled
    # (shard file name, checkpoint keys): the tensors outside the decoder layers (embeddings, norm, head),
    # copied into their shard after this layer's resume state; one layer near the end carries them, so
    # that they are written while the last layer is quantized and not after it
    rest: tuple[str, list[str]] | None = None


class HostCopier:
    """The next layer's inputs to the host for the resume state, without holding up the quantizer.

    A plain `.cpu()` of a GPU tensor from the writer thread is a copy to pageable memory queued on
    the compute stream: it waits for the next layer's queued kernels, and they wait for it (on a
    Qwen3-30B-A3B layer, 0.4 s of every layer). Here the copies go to pinned host memory on a
    stream of their own, ordered after the kernels that produced the tensors (and the allocator
    told that stream uses them, so their memory is not reused before the copy ends); the writer
    waits on the returned event. On a CPU the tensors are handed over as they are."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, acts: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        on_device = {k: v.detach().contiguous() for k, v in acts.items() if v.device.type == "cuda"}
        if self.stream is None or not on_device:
            return acts, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = dict(acts)
        with torch.cuda.stream(self.stream):
            for k, v in on_device.items():
                host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                host[k].copy_(v, non_blocking=True)
                v.record_stream(self.stream)
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return host, ready


def copy_keys(writer: CheckpointWriter, loader, keys: list[str]) -> None:
    """Add checkpoint tensors as a bf16 checkpoint holds them, read from the source shards (an FP8/MXFP4
    source's arrive dequantized)."""
    for k, t in loader.read_tensors(keys):
        writer.add_tensor(k, t)


def copy_shard(writer: CheckpointWriter, loader, shard: str, keys: list[str]) -> None:
    """Copy checkpoint tensors (see `copy_keys`) and write them, with whatever else is pending, as `shard`."""
    copy_keys(writer, loader, keys)
    writer.flush_shard(shard)


def runtime_names(loader, modules: list[str]) -> list[str]:
    """The runtime module names of checkpoint modules (`X` for the tensor `X.weight`) where transformers'
    conversion renames them. transformers + compressed-tensors, and vLLM's generic Transformers backend,
    match the `ignore` list against the modules of the model they build (phimoe's checkpoint router
    `block_sparse_moe.gate` is the runtime nn.Linear `mlp.router`): without its runtime name, a router is
    taken for a quantized Linear. A tensor a converter splits has one runtime module per part (Kimi-K2.5's
    vision `wqkv`: attn.q_proj, k_proj, v_proj), each named."""
    keys = set(loader.checkpoint_keys()) - set(loader.unexpected_keys)  # unexpected: no runtime module
    out = []
    for module in modules:
        if f"{module}.weight" in keys:
            for name in loader.runtime_names(f"{module}.weight"):
                runtime = name.removesuffix(".weight")
                if runtime != module:
                    out.append(runtime)
    return out


def _kill_point(where: str, layer: int) -> None:
    """Tests: MOEDSL_KILL_IN_WRITE=<layer>:<where> SIGKILLs the run at that point of a write."""
    if os.environ.get("MOEDSL_KILL_IN_WRITE") == f"{layer}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


class LayerWriter:
    def __init__(self, writer: CheckpointWriter, loader, commit, *, overlap: bool, phases=NO_PHASES):
        """commit(finished, acts, fingerprint, layers): records the resume state once a layer's shard is on
        disk (`OutputDir.commit_layer`)."""
        self.writer = writer
        self.loader = loader
        self.commit = commit
        self.phases = phases
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moedsl-writer") if overlap else None
        self._last: Future | None = None

    def submit(self, layer: FinishedLayer) -> None:
        if self._pool is None:
            self._write(layer)
            return
        self.drain()
        self._last = self._pool.submit(self._write, layer)

    def drain(self) -> None:
        """Wait until every submitted layer is written; raises a background error."""
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def close(self) -> None:
        """Finish the write in flight (its files stay consistent) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _write(self, layer: FinishedLayer) -> None:
        t0 = time.perf_counter()
        for packed in layer.packed:
            for name, tensors in packed.modules():
                self.writer.add_packed(name, tensors, join=packed.join, omit=packed.omit)
        copy_keys(self.writer, self.loader, layer.copies)
        self.writer.flush_shard(layer.shard)
        t1 = time.perf_counter()
        self.phases.add("write", t1 - t0)
        _kill_point("shard", layer.index)
        if layer.acts is not None:
            if layer.acts_ready is not None:
                layer.acts_ready.synchronize()
            acts = {k: v.detach().contiguous().cpu() for k, v in layer.acts.items()}
            _kill_point("acts", layer.index)
            self.commit(layer.index + 1, acts, layer.state["fingerprint"], layer.state["layers"])
            self.phases.add("resume_state", time.perf_counter() - t1)
        if layer.rest is not None:
            t2 = time.perf_counter()
            copy_shard(self.writer, self.loader, *layer.rest)
            self.phases.add("write", time.perf_counter() - t2)
