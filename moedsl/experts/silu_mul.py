"""silu(gate) ⊙ up in one pass over memory, on CUDA: the glu experts' hidden rows (fn.py).

Under `all` every expert's hidden rows on every token feed the down projections' Hessians; at
DeepSeek-V3's shape that is 256 × 131,072 × 2,048 values per layer at 64 × 2048 tokens. Torch
computes them in two elementwise kernels: silu reads gate and writes its result, the product reads
that and up and writes again, five passes over values of that size. This kernel reads gate and up
once and writes once. It rounds as torch does, step by step: silu in fp32 as x / (1 + exp(−x))
(IEEE division and addition, libdevice's expf), rounded to the data's dtype as F.silu's output is,
then the product in fp32 rounded once more; so it gives torch's values to the bit
(tests/test_cuda.py, over every bf16 value). Only for bf16: torch's fp32 silu differs from this one in
the last bit now and then (its exp or its division; not traced), which bf16's rounding never shows (every
bf16 input checked on an H200) but fp16's and fp32's do (9 of 300,000 fp16 results, a fifth of fp32 ones,
one ulp apart), so those keep torch's two kernels, as does MOEDSL_NO_TRITON=1.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False

BLOCK = 2048


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, the same values; one kernel on CUDA for same-shape contiguous bf16 tensors (the
    statistics' dtype for bf16 models), torch's two kernels otherwise."""
    if not (HAVE_TRITON and gate.is_cuda and os.environ.get("MOEDSL_NO_TRITON") != "1"
            and gate.shape == up.shape and gate.dtype == up.dtype == torch.bfloat16
            and gate.is_contiguous() and up.is_contiguous()):
        return F.silu(gate) * up
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=8)
    return out


if HAVE_TRITON:

    @triton.jit
    def _silu_mul_kernel(G, U, O, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        # IEEE division, addition and product, subnormals kept: libdevice's *_rn forms flush them to zero
        # under Triton (its FTZ setting), where torch's kernels keep them. exp's own flush cannot show:
        # 1 + a subnormal rounds to 1 either way.
        silu = tl.fdiv(g, 1.0 + libdevice.exp(-g), ieee_rounding=True)
        silu = silu.to(O.dtype.element_ty).to(tl.float32)  # F.silu's result is stored in the data's dtype
        tl.store(O + offs, (silu * u).to(O.dtype.element_ty), mask=mask)
