"""GPTQ's lazy-batch update, W[..., i2:] -= Err · Hinv[i1:i2, i2:], on tensor cores at fp32 accuracy.

After each block of columns, the block's scaled errors update every later column at once. That
product is most of GPTQ's arithmetic. In true fp32 an H200 runs it on its SIMT units (67 TFLOP/s
at best, ~34 achieved on the DeepSeek-V3 shape's 20k-row updates); TF32 runs on the tensor cores,
several times faster, but keeps only 10 significand bits, which visibly worsens GPTQ's weights.
On the H200 the split took the DeepSeek-V3 layer's gate/up stage from 3.67 to 3.01 s
(docs/benchmarks.md).

The 3×TF32 split recovers fp32 accuracy on the tensor cores. Each factor is split exactly as
a = a_hi + a_lo, with a_hi = a rounded to TF32's 10 significand bits (representable exactly)
and a_lo = a − a_hi (exact in fp32, |a_lo| ≤ 2⁻¹¹|a|). Then

    a·b = a_hi·b_hi + a_hi·b_lo + a_lo·b_hi + a_lo·b_lo

and the last term (relative size ≤ 2⁻²²) is dropped; the other three are TF32 products accumulated
in fp32, whose only rounding beyond fp32's is that of a_lo and b_lo to TF32 (again ≤ 2⁻²²
relative): a few fp32 roundings in all. The three products are one GEMM over a three-times-deeper
inner dimension,

    [E_hi | E_hi | E_lo] · [H_hi ; H_lo ; H_hi],

so W is read and written once, as in the plain update.

Only on CUDA: the CPU has no TF32, and its fp32 update is the reference. `split=True` runs the
split on any device (tests check it against the fp32 product on the CPU); MOEDSL_FP32_UPDATES=1
keeps CUDA on the plain fp32 product (for side-by-side measurements, as MOEDSL_NO_TRITON does for
the block kernel).
"""

from __future__ import annotations

import os

import torch

from moedsl.precision import tf32

_TF32_MASK = -(1 << 13)  # clears the 13 low significand bits of an fp32 (23 → TF32's 10)
_HALF = 1 << 12  # half of the last kept bit: added first, it rounds the magnitude to nearest


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (finite fp32) = hi + lo exactly, hi = x rounded to 10 significand bits (exact in TF32)."""
    hi = ((x.contiguous().view(torch.int32) + _HALF) & _TF32_MASK).view(torch.float32)
    return hi, x - hi


class SplitFactor:
    """The inverse-Hessian factor of one solve (U [n, n], or [B, n, n]), split once for all its
    blocks' updates."""

    def __init__(self, U: torch.Tensor, split: bool | None = None):
        self.U = U
        if split is None:
            split = U.is_cuda and os.environ.get("MOEDSL_FP32_UPDATES") != "1"
        self.split = split
        self.hi, self.lo = split_tf32(U) if self.split else (None, None)

    def update_(self, W: torch.Tensor, Err: torch.Tensor, i1: int, i2: int) -> None:
        """W[..., i2:] -= Err · U[..., i1:i2, i2:], in place (W [rows, n] or [B, rows, n]; Err [..., rows, i2−i1])."""
        if i2 >= W.shape[-1]:
            return
        rest = W[..., i2:]
        if not self.split:
            if W.dim() == 2:
                rest.addmm_(Err, self.U[i1:i2, i2:], alpha=-1)
            else:
                rest.baddbmm_(Err, self.U[:, i1:i2, i2:], alpha=-1)
            return
        e_hi, e_lo = split_tf32(Err)
        a = torch.cat([e_hi, e_hi, e_lo], dim=-1)
        b = torch.cat([self.hi[..., i1:i2, i2:], self.lo[..., i1:i2, i2:], self.hi[..., i1:i2, i2:]], dim=-2)
        with tf32(True):
            if W.dim() == 2:
                rest.addmm_(a, b, alpha=-1)
            else:
                rest.baddbmm_(a, b, alpha=-1)
