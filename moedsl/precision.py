"""Whether CUDA float32 matmuls may use TF32, set per region of code and restored after.

GPTQ's solves need true fp32: TF32 (an 11-bit significand) in the Cholesky inverse and the lazy
block updates visibly worsens the quantized weights. (The lazy updates use the tensor cores all the
same, through an exact split that keeps fp32 accuracy: moedsl/gptq/lazy.py.) Hessians of bf16/fp16 activations, on the
other hand, lose nothing in TF32 (their values fit its significand exactly and products
accumulate in fp32) and are several times faster; Hessians of fp32 data get full fp32.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32(enabled: bool):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def exact_in_tf32(x: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16)
