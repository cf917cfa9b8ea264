"""A safetensors file written from the tensors' own memory, with the interpreter free meanwhile.

The run's writer thread writes each layer's shard (and now and then the resume state, as large)
while the main thread launches the next layer's kernels. `safetensors.torch.save_file` copies
every tensor into a Python bytes object and serializes the file holding the GIL: on the H200 the
main thread then waited up to 153 ms in one stretch (`bench/gil.py`), with the GPU idle behind it.
Here the header is built in Python (a few ms for a layer's ~1,500 tensors) and each tensor's bytes
go to the file by a plain `write` of its memory, which releases the GIL; nothing is copied first.

The file is the one `save_file` writes, byte for byte (tests/test_safetensors_file.py holds them
side by side): the header JSON without spaces, `__metadata__` first when given (even empty),
tensors ordered by dtype (last first in safetensors' own dtype order) and then by name, their
data in that order with no gaps, and the header padded with spaces to a multiple of 8 bytes.
Reading stays with the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import torch

from moedsl.errors import MoedslError

# safetensors' dtype names, in the order of its `Dtype` enum; files list tensors by this order, last first
_DTYPES = [
    ("bool", "BOOL"), ("float4_e2m1fn_x2", "F4"), ("uint8", "U8"), ("int8", "I8"), ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e8m0fnu", "F8_E8M0"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("int16", "I16"), ("uint16", "U16"), ("float16", "F16"),
    ("bfloat16", "BF16"), ("int32", "I32"), ("uint32", "U32"), ("float32", "F32"), ("complex64", "C64"),
    ("float64", "F64"), ("int64", "I64"), ("uint64", "U64"),
]
_KNOWN = [(getattr(torch, name), stored) for name, stored in _DTYPES if hasattr(torch, name)]
_NAME = {dtype: stored for dtype, stored in _KNOWN}
_RANK = {dtype: rank for rank, (dtype, _) in enumerate(_KNOWN)}


def _shape(t: torch.Tensor) -> list[int]:
    """The shape the header records: safetensors counts F4 values, two to each byte torch counts."""
    shape = list(t.shape)
    if t.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        shape[-1] *= 2  # (write_safetensors refuses a 0-d one: half a byte)
    return shape


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer over its own memory (any dtype, numpy's or not)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (CPU tensors; views of one buffer are fine) to a safetensors file at `path`."""
    items = []
    for name, t in tensors.items():
        if t.dtype not in _NAME:
            raise MoedslError(f"cannot write `{name}` to {path}: safetensors has no dtype for {t.dtype}", code="write")
        if t.device.type != "cpu":
            raise MoedslError(f"cannot write `{name}` to {path}: it is on {t.device}, not on the CPU", code="write")
        if t.dtype == getattr(torch, "float4_e2m1fn_x2", None) and t.dim() == 0:
            raise MoedslError(f"cannot write `{name}` to {path}: a 0-d float4 tensor (safetensors stores F4 pairs)",
                              code="write")
        items.append((name, t.contiguous()))
    items.sort(key=lambda kv: (-_RANK[kv[1].dtype], kv[0]))
    header: dict = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAME[t.dtype], "shape": _shape(t), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in items:
            if t.numel():
                f.write(_bytes_of(t))  # releases the GIL for the copy into the page cache


__all__ = ["write_safetensors"]
