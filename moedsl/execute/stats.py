"""Second-moment statistics (GPTQ's Hessians), one per statistics key of the plan.

H = (2/n) Σ x xᵀ over the n input rows a key saw, accumulated in fp32. A per-expert key
holds E Hessians and E token counts. For solvers that ask for it (GPTAQ), a key also holds the
cross term D = (2/n) Σ (x_fp − x) xᵀ, x_fp the full-precision model's input row at the same
token as x: every `add` then takes the full-precision rows too (`fp`, the shape of x).
"""

from __future__ import annotations

import torch

from moedsl.precision import exact_in_tf32, tf32


class Hessian:
    """One Hessian (E=None) or a stack of E Hessians, accumulated over token batches."""

    def __init__(self, features: int, device: torch.device, experts: int | None = None, cross: bool = False):
        shape = (features, features) if experts is None else (experts, features, features)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.cross = torch.zeros(shape, dtype=torch.float32, device=device) if cross else None
        self.count = torch.zeros(() if experts is None else (experts,), dtype=torch.int64, device=device)
        self.experts = experts

    def add(self, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        """x [n, features]: rows seen by the (single) matrix; fp: the full-precision rows (cross only)."""
        with tf32(exact_in_tf32(x)):
            x = x.reshape(-1, x.shape[-1]).float()
            self.sum.addmm_(x.t(), x)
        if self.cross is not None:
            with tf32(False):
                self.cross.addmm_(self._delta(fp, x).t(), x)
        self.count += x.shape[0]

    def add_expert(self, e: int, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        with tf32(exact_in_tf32(x)):
            x = x.reshape(-1, x.shape[-1]).float()
            self.sum[e].addmm_(x.t(), x)
        if self.cross is not None:
            with tf32(False):
                self.cross[e].addmm_(self._delta(fp, x).t(), x)
        self.count[e] += x.shape[0]

    def add_batched(self, h: torch.Tensor, counts: torch.Tensor | int, fp: torch.Tensor | None = None) -> None:
        """h [E, n, features]: every expert's rows (rows of zeros add nothing; fp must be zero there too)."""
        with tf32(exact_in_tf32(h)):
            hf = h.float()
            self.sum.baddbmm_(hf.transpose(1, 2), hf)
        if self.cross is not None:
            with tf32(False):
                self.cross.baddbmm_(self._delta(fp, hf).transpose(1, 2), hf)
        self.count += counts

    @staticmethod
    def _delta(fp: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """x_fp − x in fp32 (a difference of bf16 values is not exact in TF32: the product runs in fp32)."""
        if fp is None:
            raise RuntimeError("cross statistics need the full-precision rows")  # an executor bug, never input
        return fp.reshape(x.shape).float() - x

    def _scale(self) -> torch.Tensor:
        n = self.count.clamp_min(1).float()
        scale = 2.0 / n
        return scale if self.experts is None else scale[:, None, None]

    def finalize(self) -> torch.Tensor:
        """(2/n) Σ x xᵀ; a key that saw nothing stays all zeros (GPTQ then treats every column as dead)."""
        return self.sum * self._scale()

    def finalize_cross(self) -> torch.Tensor | None:
        """(2/n) Σ (x_fp − x) xᵀ, or None when this key collects no cross term."""
        return None if self.cross is None else self.cross * self._scale()
