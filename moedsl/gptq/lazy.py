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

so W is read and written once, as in the plain update. Both operands are laid out once, not at every
block: the factor's [H_hi ; H_lo ; H_hi] slice of each block when the solve starts (`SplitFactor`), and the
error's [E_hi | E_hi | E_lo] by the block kernel itself as it computes the errors (block.py), since cutting,
splitting and concatenating them per block took about 0.5 s of a DeepSeek-V3 layer's 8.3 s on an H200
(thousands of small copies). `split_errors` is the torch form of that layout (the CPU's, and the reference).

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


def splits_on(device: torch.device) -> bool:
    """Whether lazy updates on `device` run split by default: on CUDA, unless MOEDSL_FP32_UPDATES=1."""
    return device.type == "cuda" and os.environ.get("MOEDSL_FP32_UPDATES") != "1"


def split_errors(Err: torch.Tensor) -> torch.Tensor:
    """A block's scaled errors [..., R, C] as the split update's left operand [E_hi | E_hi | E_lo] [..., R, 3C]."""
    hi, lo = split_tf32(Err)
    return torch.cat([hi, hi, lo], dim=-1)


class SplitFactor:
    """The inverse-Hessian factor of one solve (U [n, n], or [B, n, n]) and its blocks' right operands of the
    lazy update, [U_hi ; U_lo ; U_hi] over rows [i1, i2) and columns [i2, n), laid out once for all the blocks
    of `block` columns (and all the chunks of experts that share U): 1.5 n² numbers, where U_hi and U_lo
    whole would be 2 n².

    `split`: whether the update runs split (`update_` then takes the errors as `split_errors` lays them out)."""

    def __init__(self, U: torch.Tensor, block: int, split: bool | None = None):
        self.U = U
        if split is None:
            split = splits_on(U.device)
        self.split = split
        self.right: dict[int, torch.Tensor] = {}
        if split:
            n = U.shape[-1]
            hi, lo = split_tf32(U)
            for i1 in range(0, n, block):
                i2 = min(i1 + block, n)
                if i2 < n:
                    self.right[i1] = torch.cat([hi[..., i1:i2, i2:], lo[..., i1:i2, i2:], hi[..., i1:i2, i2:]], dim=-2)

    def update_(self, W: torch.Tensor, Err: torch.Tensor, i1: int, i2: int) -> None:
        """W[..., i2:] -= Err · U[..., i1:i2, i2:], in place (W [rows, n] or [B, rows, n]). Err: the block's scaled
        errors [..., rows, i2 − i1], or, when the factor is split, `split_errors` of them [..., rows, 3(i2 − i1)]."""
        if i2 >= W.shape[-1]:
            return
        if not self.split:
            _sub_product(W[..., i2:], Err, self.U[..., i1:i2, i2:])
            return
        with tf32(True):
            _sub_product(W[..., i2:], Err, self.right[i1])


def _sub_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out -= a · b in place (2-D, or batched along the first axis)."""
    if out.dim() == 2:
        out.addmm_(a, b, alpha=-1)
    else:
        out.baddbmm_(a, b, alpha=-1)
