"""A safetensors file written from the tensors' own memory, with the interpreter free meanwhile.

The run's writer thread writes each layer's shard (and now and then the resume state, as large)
while the main thread launches the next layer's kernels. `safetensors.torch.save_file` copies
every tensor into a Python bytes object and serializes the file holding the GIL: on the H200 the
main thread then waited up to 153 ms in one stretch (`bench/gil.py`), with the GPU idle behind it.
Here the header is built in Python (a few ms for a layer's ~1,500 tensors) and the tensors' bytes go
to the file straight from their memory by `os.writev`, up to 1,024 tensors per system call, which
runs with the GIL released; nothing is copied first. Few calls matter as much as the GIL's release:
each call the writer makes hands the interpreter back and forth with the main thread, and a
main thread that launches thousands of small kernels pays for every hand-over (`bench/gil.py`).

The file is the one `save_file` writes, byte for byte (tests/test_safetensors_file.py holds them
side by side): the header JSON without spaces, `__metadata__` first when given (even empty), tensors ordered
by dtype (largest first, in safetensors' own dtype order) and then by name, their data in that
order with no gaps, and the header padded with spaces to a multiple of 8 bytes. Reading stays
with the safetensors library.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from typing import Mapping

import torch

# safetensors' dtype names, in the order of its `Dtype` enum; files list tensors by this order, last first
_DTYPES = [
    (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"), (getattr(torch, "float8_e8m0fnu", None), "F8_E8M0"),
    (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"), (torch.bfloat16, "BF16"),
    (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"), (torch.float64, "F64"),
    (torch.int64, "I64"), (torch.uint64, "U64"),
]
_NAME = {dtype: name for dtype, name in _DTYPES if dtype is not None}
_RANK = {dtype: rank for rank, (dtype, _) in enumerate(_DTYPES) if dtype is not None}


_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_CALL_BYTES = 1 << 30  # bytes per writev (Linux writes at most 0x7ffff000 in one call)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a buffer over its own memory (any dtype, numpy's or not)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write `buffers` in order, in as few `os.writev` calls as the limits allow (a short write resumes
    where it stopped)."""
    pending, first = list(buffers), 0
    while first < len(pending):
        stop, size = first, 0
        while stop < len(pending) and stop - first < _IOV_MAX and size < _CALL_BYTES:
            size += len(pending[stop])
            stop += 1
        written = os.writev(fd, pending[first:stop])
        while written:  # past the buffers written whole; the rest of one written in part
            if written >= len(pending[first]):
                written -= len(pending[first])
                first += 1
            else:
                pending[first] = pending[first][written:]
                written = 0


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (CPU tensors; views of one buffer are fine) to a safetensors file at `path`."""
    items = []
    for name, t in tensors.items():
        if t.dtype not in _NAME:
            raise TypeError(f"`{name}`: safetensors has no dtype for {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"`{name}` is on {t.device}; write_safetensors takes CPU tensors")
        items.append((name, t.contiguous()))
    items.sort(key=lambda kv: (-_RANK[kv[1].dtype], kv[0]))
    header: dict = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    buffers = [memoryview(struct.pack("<Q", len(text))), memoryview(text)]
    buffers += [_bytes_of(t) for _, t in items if t.numel()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, buffers)  # the tensors stay referenced by `items` until the last call returns
    finally:
        os.close(fd)


__all__ = ["write_safetensors"]
