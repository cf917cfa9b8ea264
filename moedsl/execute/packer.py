"""The packer stage: quantized stacks in, the checkpoint's stored tensors out, on the host.

Each `Quantized` from the quantizer (one linear, or every expert of a solve chunk) is packed in
one batched pass on the device that solved it (`CheckpointWriter.pack_stack`: the GPU when
there is one), and everything it stores — packed int32 words, scales, zero-points, g_idx,
biases — is gathered into one byte buffer and copied to pinned host memory in one
asynchronous copy. The writer thread waits for that copy and cuts the buffer into per-module
tensors (`Packed.modules`); the quantizer never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from moedsl.gptq.quantizer import QuantStack
from moedsl.write.checkpoint import CheckpointWriter


@dataclass
class Packed:
    """The stored tensors of n modules, in one host buffer (being filled while `ready` is pending)."""

    names: list[str]  # full module names, one per matrix
    buffer: torch.Tensor  # uint8, on the host
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]  # (local key, dtype, shape, offset, bytes)
    ready: torch.cuda.Event | None = None
    join: str = "."  # keys are name + join + local key (`_` for an engine's stacked expert names)
    omit: tuple[str, ...] = ()  # local keys not stored (a stacked layout has no name for them)

    def modules(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(module name, {local key: tensor}) per module: views of the one host buffer, no copies (the
        shard writer writes each tensor from its own memory)."""
        if self.ready is not None:
            self.ready.synchronize()
        for j, name in enumerate(self.names):
            tensors = {}
            for local, dtype, shape, offset, size in self.layout:
                start = offset + j * size
                tensors[local] = self.buffer[start:start + size].view(dtype).view(shape)
            yield name, tensors


class Packer:
    def __init__(self, writer: CheckpointWriter, dtype: torch.dtype):
        """dtype: the model dtype (scales and biases of compressed-tensors, biases of GPTQ)."""
        self.writer = writer
        self.dtype = dtype

    def pack(self, names: list[str], stack: QuantStack, expert: bool, join: str = ".",
             omit: tuple[str, ...] = ()) -> Packed:
        stored = self.writer.pack_stack(names, stack, self.dtype, expert=expert)  # local -> [n, ...]
        layout, pieces, offset = [], [], 0
        n = len(names)
        for local, t in stored.items():
            if offset % 8:  # every piece starts aligned for its dtype's view
                pieces.append(torch.zeros(8 - offset % 8, dtype=torch.uint8, device=t.device))
                offset += 8 - offset % 8
            flat = t.reshape(-1).view(torch.uint8)
            size = flat.numel() // n
            layout.append((local, t.dtype, tuple(t.shape[1:]), offset, size))
            pieces.append(flat)
            offset += flat.numel()
        device = stack.codes.device
        if device.type != "cuda":
            return Packed(list(names), torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone(), layout,
                          join=join, omit=omit)
        flat = torch.cat(pieces)
        host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
        return Packed(list(names), host, layout, ready, join, omit)


def packed_bytes(packed: list[Packed]) -> int:
    return sum(p.buffer.numel() for p in packed)


__all__ = ["Packed", "Packer", "packed_bytes"]
