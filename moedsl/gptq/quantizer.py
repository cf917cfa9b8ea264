"""The quantization grid: its options, its min/max parameters, and round-to-nearest.

A weight w in a group with scale s and integer zero-point z is stored as the unsigned code

    q = clamp(round(w / s) + z, 0, maxq),      maxq = 2**bits - 1

and read back as  s * (q - z).  Symmetric grids use z = (maxq + 1) / 2 (8 for 4 bits), the
GPTQ convention, so codes are unsigned for both kinds and the writers never need signs.

Scales are rounded to `QuantConfig.scale_dtype` (float16 by default, what GPTQ checkpoints
store) the moment they are made, so GPTQ's error feedback sees the weights a loader will
really compute, and a writer stores the scales without changing them.
"""

from __future__ import annotations


import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from moedsl.errors import MoedslError, nearest

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QuantConfig(BaseModel):
    """How to quantize one weight matrix. Bad values raise `MoedslError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int
    group_size: int = 128  # -1: one group spanning the whole row (per-channel)
    sym: bool = True
    act_order: bool = False  # solve columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # grids fixed up front on the original, contiguous groups
    damp_percent: float = 0.01  # damping = damp_percent * mean(diag H)
    damp_auto_increment: float = 0.01  # added to damp_percent each time Cholesky fails
    block_size: int = 128  # columns per lazy-batch block
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(e) from None

    @classmethod
    def model_validate(cls, obj, **kwargs) -> "QuantConfig":
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _config_error(e) from None

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group_size must be -1 (one group per row) or a positive number of columns, got {v}")
        return v

    @field_validator("damp_percent")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"damp_percent must be in [0, 1], got {v}")
        return v

    @field_validator("damp_auto_increment")
    @classmethod
    def _damp_inc(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"damp_auto_increment must be in [0, 1] (0 disables retries), got {v}")
        return v

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"block_size must be positive, got {v}")
        return v

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def n_groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(columns / self.group_size)

    def group_width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size


def _config_error(e: ValidationError) -> MoedslError:
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            hint = nearest(where, QuantConfig.model_fields)
            problems.append(f"unknown option `{where}`" + (f" (did you mean `{hint}`?)" if hint else ""))
        else:
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return MoedslError(f"invalid quantization config: {'; '.join(problems)}", code="config")


@dataclass(frozen=True, eq=False)
class QuantResult:
    """One quantized matrix, everything in the ORIGINAL column order.

    weight  fp32 [out, in]   the dequantized weight, == dequantize_codes(codes, scales, zeros, g_idx)
    codes   uint8 [out, in]  integer codes in [0, 2**bits - 1]
    scales  fp32 [out, G]    values exactly representable in QuantConfig.scale_dtype
    zeros   int32 [out, G]   integer zero-points in [0, 2**bits - 1]
    g_idx   int32 [in]       group of each input column
    loss    float            GPTQ's objective: sum over rows and columns of (w - q)^2 / (2 d^2),
                             d the diagonal of the inverse-Hessian Cholesky factor (RTN: d = 1)
    damp    float            the damp_percent actually used (after any automatic increase)
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float
    damp: float

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, self.g_idx)


@dataclass(frozen=True, eq=False)
class QuantStack:
    """n quantized matrices of one shape, stacked on a leading axis: what the packer and the
    writers take (many experts at once, or a single matrix with n = 1). Codes and grids only;
    the dense weights live in the model.

    codes   uint8 [n, out, in]
    scales  fp32  [n, out, G]
    zeros   int32 [n, out, G]
    g_idx   int32 [n, in]
    bias          [n, out] or None
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None = None

    @staticmethod
    def of(results: list[QuantResult], bias: torch.Tensor | None = None) -> "QuantStack":
        """Stack same-shape results (bias: [n, out] or None)."""
        return QuantStack(codes=torch.stack([r.codes for r in results]),
                          scales=torch.stack([r.scales for r in results]),
                          zeros=torch.stack([r.zeros for r in results]),
                          g_idx=torch.stack([r.g_idx for r in results]), bias=bias)

    def __len__(self) -> int:
        return self.codes.shape[0]

    def to(self, device) -> "QuantStack":
        return QuantStack(*(t.detach().to(device) if t is not None else None
                            for t in (self.codes, self.scales, self.zeros, self.g_idx, self.bias)))


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 scales to `dtype` and back, never to zero or infinity."""
    if dtype == torch.float32:
        return scale
    info = torch.finfo(dtype)
    least_subnormal = info.smallest_normal * info.eps
    return scale.to(dtype).to(torch.float32).clamp(min=least_subnormal, max=info.max)


def find_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float32):
    """Min/max grid of each row of w [..., rows, cols] -> (scale, zero), both fp32 [..., rows].

    As in GPTQ, the range always contains 0 (so zero weights stay exactly zero). A symmetric
    grid is centred: [-m, m] with m = max|w|, which keeps the range whole for rows that are
    all positive (the reference code halves it there).
    """
    maxq = 2**bits - 1
    # GPTQ sweeps call this once per group of every chunk: few kernels each (one launch is most of a call's cost)
    if sym:
        # the range [-m, m], m = max|w|: the same number as max(-min(w, 0), max(w, 0))
        xmax = w.abs().amax(dim=-1)
        xmax = torch.where(xmax == 0, 1.0, xmax)  # an all-zero row: any grid will do
        scale = round_scale((xmax + xmax) / maxq, scale_dtype)  # xmax − (−xmax), exactly
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    xmin, xmax = torch.aminmax(w, dim=-1)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid will do
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = round_scale((xmax - xmin) / maxq, scale_dtype)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (as floats) of w on the grid (scale, zero); shapes broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """fp32 [..., out, in] weight from codes [..., out, in], scales/zeros [..., out, G] and g_idx [..., in]
    (one matrix, or a stack of them)."""
    index = g_idx.long().unsqueeze(-2).expand(codes.shape)
    return dequantize(codes.to(torch.float32), scales.to(torch.float32).gather(-1, index),
                      zeros.to(torch.float32).gather(-1, index))


def trivial_g_idx(columns: int, cfg: QuantConfig, device=None) -> torch.Tensor:
    return (torch.arange(columns, device=device) // cfg.group_width(columns)).to(torch.int32)


def group_grids(W: torch.Tensor, cfg: QuantConfig, grid=find_params) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of the contiguous column groups of W [..., rows, cols] -> scales, zeros [..., rows, G].

    grid: how one group's (scale, zero) is found; `find_params` (min/max) unless a solver says otherwise."""
    cols = W.shape[-1]
    width = cfg.group_width(cols)
    if cols % width == 0:  # every group at once: the grid works on the last dim, whatever comes before
        return grid(W.unflatten(-1, (cols // width, width)), cfg.bits, cfg.sym, cfg.torch_scale_dtype)
    grids = [grid(W[..., j : j + width], cfg.bits, cfg.sym, cfg.torch_scale_dtype) for j in range(0, cols, width)]
    return torch.stack([s for s, _ in grids], dim=-1), torch.stack([z for _, z in grids], dim=-1)


def rtn_quantize(W: torch.Tensor, cfg: QuantConfig, grid=find_params) -> QuantResult:
    """Round-to-nearest on the same grids GPTQ uses: the baseline. act_order has no meaning here."""
    W, codes, Q, scales, zeros, g_idx = _rtn(W, cfg, grid)
    loss = float(((W - Q) ** 2).sum() / 2)
    return QuantResult(
        weight=Q,
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        loss=loss,
        damp=0.0,
    )


def rtn_weight(W: torch.Tensor, cfg: QuantConfig, grid=find_params) -> torch.Tensor:
    """rtn_quantize's dequantized weight alone: without its loss, a figure that would make the caller wait
    for the device (the report's RTN error needs only the weight)."""
    return _rtn(W, cfg, grid)[2]


def _rtn(W: torch.Tensor, cfg: QuantConfig, grid):
    if W.dim() != 2:
        raise MoedslError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float32)
    scales, zeros = group_grids(W, cfg, grid)
    g_idx = trivial_g_idx(W.shape[1], cfg, W.device)
    g = g_idx.long()
    codes = quantize(W, scales[:, g], zeros[:, g], cfg.maxq)
    return W, codes, dequantize(codes, scales[:, g], zeros[:, g]), scales, zeros, g_idx
