"""Second-moment statistics (GPTQ's Hessians), one per statistics key of the plan.

H = (2/n) Σ x xᵀ over the n input rows a key saw, accumulated in fp32. A per-expert key
holds E Hessians and E token counts.
"""

from __future__ import annotations

import torch

from moedsl.precision import exact_in_tf32, tf32


class Hessian:
    """One Hessian (E=None) or a stack of E Hessians, accumulated over token batches."""

    def __init__(self, features: int, device: torch.device, experts: int | None = None):
        shape = (features, features) if experts is None else (experts, features, features)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(() if experts is None else (experts,), dtype=torch.int64, device=device)
        self.experts = experts

    def add(self, x: torch.Tensor) -> None:
        """x [n, features]: rows seen by the (single) matrix."""
        x = x.reshape(-1, x.shape[-1])
        accumulate_gram(self.sum, x)
        self.count += x.shape[0]

    def add_expert(self, e: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        accumulate_gram(self.sum[e], x)
        self.count[e] += x.shape[0]

    def add_batched(self, h: torch.Tensor, counts: torch.Tensor | int) -> None:
        """h [E, n, features]: every expert's rows (rows of zeros add nothing)."""
        accumulate_gram(self.sum, h)
        self.count += counts

    def finalize(self) -> torch.Tensor:
        """(2/n) Σ x xᵀ; a key that saw nothing stays all zeros (GPTQ then treats every column as dead)."""
        n = self.count.clamp_min(1).float()
        scale = 2.0 / n
        return self.sum * (scale if self.experts is None else scale[:, None, None])


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx in fp32, for x [n, f] (acc [f, f]) or a batch x [E, n, f] (acc [E, f, f]).

    fp32 products, in TF32 on CUDA where that is exact (bf16/fp16 data: moedsl/precision.py).
    (Products of bf16 straight into fp32, torch 2.11's `out_dtype`, were tried on the H200: they ran
    at about the TF32 peak rate all the same, and the GLM-4.5-Air layer's peak memory rose by
    2.3 GiB, about two temporary copies of its down projections' Hessians.)"""
    with tf32(exact_in_tf32(x)):
        xf = x.float()
        xtf = xf.transpose(-1, -2)
        if x.dim() == 3:
            acc.baddbmm_(xtf, xf)
        else:
            acc.addmm_(xtf, xf)
