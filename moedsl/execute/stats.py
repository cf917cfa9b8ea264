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
        x = x.reshape(-1, x.shape[-1])
        accumulate_gram(self.sum, x)
        if self.cross is not None:
            xf = x.float()
            with tf32(False):
                self.cross.addmm_(self._delta(fp, xf).t(), xf)
        self.count += x.shape[0]

    def add_expert(self, e: int, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        accumulate_gram(self.sum[e], x)
        if self.cross is not None:
            xf = x.float()
            with tf32(False):
                self.cross[e].addmm_(self._delta(fp, xf).t(), xf)
        self.count[e] += x.shape[0]

    def add_batched(self, h: torch.Tensor, counts: torch.Tensor | int, fp: torch.Tensor | None = None) -> None:
        """h [E, n, features]: every expert's rows (rows of zeros add nothing; fp must be zero there too)."""
        accumulate_gram(self.sum, h)
        if self.cross is not None:
            hf = h.float()
            with tf32(False):
                self.cross.baddbmm_(self._delta(fp, hf).transpose(1, 2), hf)
        self.count += counts

    def experts_slice(self, e0: int, e1: int) -> "Hessian":
        """Experts e0..e1 of this stack (Hessians, cross terms, counts), sharing its storage."""
        part = Hessian.__new__(Hessian)
        part.sum, part.count, part.experts = self.sum[e0:e1], self.count[e0:e1], e1 - e0
        part.cross = None if self.cross is None else self.cross[e0:e1]
        return part

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


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx in fp32, for x [n, f] (acc [f, f]) or a batch x [E, n, f] (acc [E, f, f]).

    bf16/fp16 data on CUDA: the products run on the half-precision tensor cores straight into fp32
    (`out_dtype`): a product of two bf16 values is exact in fp32, so this is the TF32 path's arithmetic,
    faster and without an fp32 copy of x. The product adds to acc in its own epilogue (`addmm`/`baddbmm`
    into acc, in place) where this torch has that form; else it goes through a temporary of at most
    TEMPORARY_BYTES (one expert's, if larger) that is then added, an extra pass over the accumulators (at
    DeepSeek-V3's shape, 77 ms of a layer's down statistics on an H200). Elsewhere: fp32 products, in TF32
    on CUDA where that is exact (moedsl/precision.py)."""
    xt = x.transpose(-1, -2)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _ACCUMULATING_PRODUCTS[0]:
        try:
            (torch.addmm if x.dim() == 2 else torch.baddbmm)(acc, xt, x, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError) as exc:  # a torch without half-precision products added into fp32
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            _ACCUMULATING_PRODUCTS[0] = False
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _HALF_PRODUCTS[0]:
        try:
            if x.dim() == 2:
                acc += torch.mm(xt, x, out_dtype=torch.float32)
                return
            step = max(1, TEMPORARY_BYTES // (4 * acc[0].numel()))  # the temporary stays small
            for e in range(0, x.shape[0], step):
                acc[e:e + step] += torch.bmm(xt[e:e + step], x[e:e + step], out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError) as exc:  # a torch without half-precision products into fp32
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            _HALF_PRODUCTS[0] = False
    with tf32(exact_in_tf32(x)):
        xf = x.float()
        xtf = xf.transpose(-1, -2)
        if x.dim() == 3:
            acc.baddbmm_(xtf, xf)
        else:
            acc.addmm_(xtf, xf)


TEMPORARY_BYTES = 256 << 20
_HALF_PRODUCTS = [True]  # cleared once if this torch lacks `out_dtype` products
_ACCUMULATING_PRODUCTS = [True]  # cleared once if it lacks them as addmm/baddbmm into the accumulator


class BlockedHessian:
    """A per-expert key's Hessians by fixed expert block (`distributed.expert_blocks`): only the blocks this
    rank owns, each a stack of its experts' Hessians (and cross terms). One rank owns every block."""

    def __init__(self, features: int, device: torch.device, blocks: dict[int, tuple[int, int]], cross: bool = False):
        self.blocks = dict(blocks)  # block index -> (first expert, one past the last)
        self.parts = {k: Hessian(features, device, e1 - e0, cross) for k, (e0, e1) in self.blocks.items()}

    @property
    def count(self) -> torch.Tensor:
        """Tokens per expert of the owned blocks, in expert order."""
        return torch.cat([self.parts[k].count for k in sorted(self.parts)])
