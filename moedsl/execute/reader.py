"""The reader stage: decoder layers' checkpoint tensors, read from the shards ahead of the quantizer.

`get(i)` returns layer i's tensors in host memory (pinned when the device is a GPU, so the copy
to it is fast) and, when overlapping, starts reading layer i+1 on a background thread at once,
so that read runs while layer i is quantized. One layer is read ahead at most: with the layer
being loaded, host memory holds about two layers. Step by step (`overlap=False`), `get` reads
on the calling thread and nothing runs ahead. Reading goes through the loader
(`LayerwiseLoader.read_layer`), which owns how a checkpoint's tensors are read.

The first layer the run reads is left in pageable memory (the shards' mapped pages). Pinned memory
is slow to get the first time: the allocator page-locks every new block, and torch caches the
blocks only once they are freed. On an H200 host the run waited 0.9 s for a pinned first
Qwen3-30B-A3B layer (1.25 GB) and 21.8 s for a DeepSeek-V3 one (23 GB); copying from pageable
memory costs the quantizer's thread about what the copy takes. The layers after it are read
while the one before is quantized, where pinning costs nothing seen.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moedsl.execute.loader import LayerwiseLoader, StoredParts
from moedsl.execute.phases import NO_PHASES


class LayerReader:
    def __init__(self, loader: LayerwiseLoader, stop: int, *, pin: bool, overlap: bool, phases=NO_PHASES):
        """stop: one past the last layer to read."""
        self.loader = loader
        self.stop = stop
        self.pin = pin
        self.phases = phases
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moedsl-reader") if overlap else None
        self._ahead: dict[int, Future] = {}
        self._first = True  # the run's first read: not pinned (see above)

    def _read(self, i: int, pin: bool) -> dict[str, torch.Tensor | StoredParts]:
        t0 = time.perf_counter()
        tensors = self.loader.read_layer(i, pin=pin)
        if self._pool is not None:  # step by step, reading is part of the main thread's `read`
            self.phases.add("read_ahead", time.perf_counter() - t0)
        return tensors

    def _submit(self, i: int) -> Future:
        pin, self._first = self.pin and not self._first, False
        return self._pool.submit(self._read, i, pin)

    def prefetch(self, i: int) -> None:
        """Start reading layer i now (the first layer, while the run is still starting up)."""
        if self._pool is not None and i < self.stop and i not in self._ahead:
            self._ahead[i] = self._submit(i)

    def get(self, i: int) -> dict[str, torch.Tensor | StoredParts]:
        """Layer i's tensors (waiting for them if they are being read); starts reading layer i+1."""
        ahead = self._ahead.pop(i, None)
        for j in [j for j in self._ahead if j != i + 1]:  # a wrong guess of where a resumed run starts
            self._ahead.pop(j).cancel()
        if self._pool is None:
            tensors = self._read(i, self.pin)  # step by step: the main thread copies and waits either way
        else:
            if ahead is None:
                ahead = self._submit(i)
            if i + 1 < self.stop:
                self._ahead[i + 1] = self._submit(i + 1)
            tensors = ahead.result()  # a read error is raised here, on the quantizer's thread
        return tensors

    def close(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
