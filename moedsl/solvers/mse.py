"""GPTQ on MSE-searched grids: each group's range is clipped where its rounding error is least.

A min/max grid spends its levels on the group's extreme weights. Shrinking the range by a
factor p < 1 clips those few weights but rounds all the others more finely. For each group,
try p = 1, 1 − 1/grid, …, down to 1 − maxshrink, and keep the grid whose rounding error

    Σ |w − Q_p(w)|^norm

is least (norm 2.4, grid 100, maxshrink 0.8: the clipping search of the GPTQ reference code
and of the peers' "mse observer"). GPTQ then runs unchanged on those grids: with dynamic groups
each group's search sees its weights after the error feedback of the groups before it.
"""

from __future__ import annotations

import torch

from moedsl.gptq.quantizer import dequantize, find_params, quantize
from moedsl.solvers.gptq import GPTQ

NORM, GRID, MAXSHRINK = 2.4, 100, 0.8


def find_params_mse(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float32,
                    norm: float = NORM, grid: int = GRID, maxshrink: float = MAXSHRINK):
    """Like `find_params` (w [..., rows, cols] → scale, zero [..., rows]), with the least-error clipping."""
    best_scale, best_zero = find_params(w, bits, sym, scale_dtype)
    best_err = _error(w, best_scale, best_zero, bits, norm)
    for i in range(1, int(maxshrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = find_params(w * p, bits, sym, scale_dtype)  # the range of the shrunk weights: p·[min, max]
        err = _error(w, scale, zero, bits, norm)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _error(w, scale, zero, bits, norm):
    s, z = scale[..., None], zero[..., None]
    return (w - dequantize(quantize(w, s, z, 2**bits - 1), s, z)).abs().pow(norm).sum(dim=-1)


class MSE(GPTQ):
    base_name = "mse"
    grid = staticmethod(find_params_mse)
