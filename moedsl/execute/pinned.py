"""Pinned host memory: how torch's CUDA host allocator gets new blocks, set before torch is imported.

The reader (layer i+1's tensors), the packer (each stack's packed words) and the resume state's
copies go through pinned host memory, and a run's first layers get every block new. By default
torch makes a new block with one `cudaHostAlloc` on the calling thread: 1.1 GB/s for 3 MB blocks
(a Qwen3-30B-A3B expert's) and 1.35 GB/s for 28 MB ones (a DeepSeek-V3 expert's) on an H200 host.
With `pinned_use_cuda_host_register` it allocates plain memory and page-locks it with
`cudaHostRegister` on `pinned_num_register_threads` threads: 3.0 and 6.2 GB/s there, with 8.
`moedsl quantize` asks for that unless the environment already says how to pin (a `pinned_*` key
in the allocator settings); the settings only apply when set before torch starts, so the command
sets them first thing. Library users set them themselves (docs/cli.md).
"""

from __future__ import annotations

import os
from typing import MutableMapping

PINNED_SETTINGS = (("pinned_use_cuda_host_register", "True"), ("pinned_num_register_threads", "8"))


def with_pinned_settings(conf: str | None) -> str:
    """Allocator settings (`key:value,...`) with ours added; any `pinned_*` key already there keeps the
    given settings as they are."""
    parts = [p.strip() for p in (conf or "").split(",") if p.strip()]
    if any(p.startswith("pinned_") for p in parts):
        return ",".join(parts)
    return ",".join(parts + [f"{key}:{value}" for key, value in PINNED_SETTINGS])


def configure_pinned_memory(env: MutableMapping[str, str] = os.environ) -> None:
    """Add our pinned settings to the allocator settings torch will read (`PYTORCH_ALLOC_CONF` when it is
    set, torch's newer name, else `PYTORCH_CUDA_ALLOC_CONF`)."""
    name = "PYTORCH_ALLOC_CONF" if "PYTORCH_ALLOC_CONF" in env else "PYTORCH_CUDA_ALLOC_CONF"
    env[name] = with_pinned_settings(env.get(name))
