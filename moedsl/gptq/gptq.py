"""GPTQ (Frantar et al., 2022) for one weight matrix.

Given W [out, in] and the Hessian H = 2·XᵀX of its inputs (any positive multiple works),
quantize W one input column at a time, and after each column spread its rounding error over
the columns not yet quantized so that X·Wᵀ changes as little as possible. The paper's three
ingredients, in the order they appear below:

  1. the inverse Hessian enters only through the upper Cholesky factor U of H⁻¹
     (Hinv below): column i's error is divided by U[i, i] and spread along row U[i, i:];
  2. lazy batches: inside a block of `block_size` columns updates are applied column by
     column, the rest of the matrix gets the block's accumulated error in one matmul;
  3. damping: λ = damp_percent · mean(diag H) is added to the diagonal, increased by
     damp_auto_increment each time the Cholesky factorization fails.

Everything runs in fp32 on W's device. See batched.py for the same algorithm over many
matrices at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.block import solve_block
from moedsl.gptq.lazy import SplitFactor
from moedsl.gptq.quantizer import QuantConfig, QuantResult, find_params, group_grids
from moedsl.precision import tf32


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grid=find_params) -> QuantResult:
    """Quantize W [out, in] with GPTQ against the Hessian H [in, in].

    grid: how a group's (scale, zero) is chosen from its weights (min/max by default; see solvers/mse.py)."""
    result, _ = gptq_solve(W, H, cfg, grid)
    return result


def gptq_solve(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grid=find_params,
               prepared: PreparedHessian | None = None) -> tuple[QuantResult, torch.Tensor]:
    """gptq_quantize, also returning the loss of each row (fp32 [out]); rows are independent.

    prepared: `prepare_hessian(H, cfg)` computed once for every matrix that shares H (the chunks of
    a stack of experts), so its Cholesky factorizations run once instead of once per chunk."""
    with tf32(False):  # GPTQ needs true fp32 whatever the caller set (moedsl/precision.py)
        check_inputs(W, H)
        if prepared is None:
            prepared = prepare_hessian(H, cfg)
        return _gptq_solve(W, prepared, cfg, grid)


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ derives from H alone: the dead inputs, the column order and the factor of H⁻¹."""

    dead: torch.Tensor  # [in] bool: inputs that were always zero
    perm: torch.Tensor  # [in]: solve order (activation order, or the identity)
    Hinv: torch.Tensor  # [in, in]: upper Cholesky factor of (H + λI)⁻¹, in solve order
    damp: float  # the damp_percent λ was taken from
    factor: SplitFactor  # Hinv as the lazy updates read it (lazy.py)


def prepare_hessian(H: torch.Tensor, cfg: QuantConfig) -> PreparedHessian:
    with tf32(False):
        H = H.detach().to(torch.float32, copy=True)
        columns = H.shape[0]
        # An input that was always zero carries no information: give it a unit Hessian entry so
        # H stays invertible, and a zero weight (the reference GPTQ convention).
        dead = torch.diag(H) == 0
        H.diagonal().masked_fill_(dead, 1)  # H[dead, dead] = 1, without the device sync of a boolean index
        # Activation order: the columns with the largest Hessian diagonal (the most used inputs)
        # are quantized first, while many columns remain to absorb their error.
        if cfg.act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            H = H[perm][:, perm]
        else:
            perm = torch.arange(columns, device=H.device)
        Hinv, damp = inverse_hessian_factor(H, cfg)
        return PreparedHessian(dead, perm, Hinv, damp, lazy_factor(Hinv, cfg))


def _gptq_solve(W: torch.Tensor, prepared: PreparedHessian, cfg: QuantConfig, grid) -> tuple[QuantResult, torch.Tensor]:
    W = W.detach().to(torch.float32, copy=True)
    rows, columns = W.shape
    maxq = cfg.maxq
    dead, perm, Hinv = prepared.dead.to(W.device), prepared.perm.to(W.device), prepared.Hinv.to(W.device)
    W.masked_fill_(dead, 0)  # W[:, dead] = 0, without the device sync of a boolean index
    # the lazy updates' product on tensor cores, at fp32 accuracy (lazy.py)
    factor = prepared.factor if prepared.Hinv.device == W.device else lazy_factor(Hinv, cfg)

    # Grids fixed before any update: per-channel (-1), or static groups, always over the
    # original contiguous column groups.
    width = cfg.group_width(columns)
    fixed_grids = cfg.group_size == -1 or cfg.static_groups
    n_groups = cfg.n_groups(columns)
    if fixed_grids:
        scales, zeros = group_grids(W, cfg, grid)
    else:
        scales = torch.zeros(rows, n_groups, device=W.device)
        zeros = torch.zeros(rows, n_groups, device=W.device)
    if cfg.act_order:
        W = W[:, perm]

    # column-major underneath: the block kernel stores each column of every row into them, no copy per block
    Q = torch.empty(columns, rows, device=W.device).t()
    codes = torch.empty(columns, rows, device=W.device, dtype=torch.uint8).t()
    losses = torch.zeros(rows, device=W.device)
    # Group of each column position in solve order.
    if fixed_grids:
        group_of = perm // width
    else:
        group_of = torch.arange(columns, device=W.device) // width

    block = solve_block_width(cfg, columns)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        if not fixed_grids and i1 % width == 0:
            g = i1 // width
            scales[:, g], zeros[:, g] = grid(W[:, i1 : i1 + width], cfg.bits, cfg.sym, cfg.torch_scale_dtype)
        scale1, zero1 = block_grid(scales, zeros, group_of, i1, i2, width, moved=fixed_grids and cfg.act_order)
        _, _, Err1, loss1 = solve_block(W[None, :, i1:i2], Hinv[None, i1:i2, i1:i2], scale1[None], zero1[None],
                                        maxq, factor.split, out=(Q[None, :, i1:i2], codes[None, :, i1:i2]))
        losses += loss1[0]
        # ...and the block's accumulated error over all later columns at once (lazy batch), in place.
        factor.update_(W, Err1[0], i1, i2)

    # Back to the original column order; g_idx says which group each original column used.
    inv = torch.argsort(perm)
    g_idx = group_of[inv].to(torch.int32)
    reorder = cfg.act_order  # without act_order the solve order is the original order: no copies
    result = QuantResult(
        weight=Q[:, inv] if reorder else Q,
        codes=codes[:, inv] if reorder else codes,
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        loss=float(losses.sum()),
        damp=prepared.damp,
    )
    return result, losses


def solve_block_width(cfg: QuantConfig, columns: int) -> int:
    """The columns of one lazy batch. Blocks start wherever a dynamic group starts, so each group's grid is
    taken once, at the start of a block, from its weights with every earlier update applied."""
    fixed_grids = cfg.group_size == -1 or cfg.static_groups
    return cfg.block_size if fixed_grids else math.gcd(cfg.block_size, cfg.group_width(columns))


def lazy_factor(Hinv: torch.Tensor, cfg: QuantConfig) -> SplitFactor:
    """Hinv [.., n, n] laid out for the lazy updates of a solve by cfg (lazy.py)."""
    return SplitFactor(Hinv, solve_block_width(cfg, Hinv.shape[-1]))


def block_grid(scales: torch.Tensor, zeros: torch.Tensor, group_of: torch.Tensor, i1: int, i2: int, width: int,
               moved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each column of block [i1, i2): scales/zeros [..., rows, G] → [..., rows, i2 − i1]. A block
    inside one group (columns in their own order, `moved` False) gets that group's line expanded, not copied."""
    if not moved and i1 // width == (i2 - 1) // width:
        g = i1 // width
        shape = (*scales.shape[:-1], i2 - i1)
        return scales[..., g : g + 1].expand(shape), zeros[..., g : g + 1].expand(shape)
    groups = group_of[..., i1:i2]
    return scales[..., groups], zeros[..., groups]


def inverse_hessian_factor(H: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ until the factorization succeeds.

    Returns the factor and the damp_percent used.
    """
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in damp_schedule(cfg):
        U, info = upper_factor_of_inverse(H + attempt * mean_diag * eye)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U.contiguous(), attempt  # row-major: each block reads rows of it
    raise damp_error(cfg)


def upper_factor_of_inverse(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U upper triangular with UᵀU = A⁻¹, for A [.., n, n] symmetric positive definite; and the
    factorization's info (0: success).

    Without forming A⁻¹: with J the reversal of the n indices, JAJ = LLᵀ (its Cholesky factor),
    and U = J L⁻¹ J. (A = U⁻¹U⁻ᵀ with U⁻¹ upper, so J U⁻¹ J is the lower factor of JAJ.) One
    Cholesky and one triangular inverse, where inverting A and factoring the inverse takes about
    twice the arithmetic, and the same numbers up to rounding."""
    flip = (-2, -1)
    L, info = torch.linalg.cholesky_ex(A.flip(flip))
    eye = torch.eye(A.shape[-1], device=A.device, dtype=A.dtype).expand_as(A)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(flip), info


def damp_schedule(cfg: QuantConfig) -> list[float]:
    """damp_percent, then + k·damp_auto_increment for k = 1, 2, ... while it stays <= 1."""
    out = [cfg.damp_percent]
    if cfg.damp_auto_increment > 0:
        k = 1
        while cfg.damp_percent + k * cfg.damp_auto_increment <= 1.0 + 1e-9:
            out.append(cfg.damp_percent + k * cfg.damp_auto_increment)
            k += 1
    return out


def damp_error(cfg: QuantConfig, what: str = "the Hessian") -> MoedslError:
    tried = damp_schedule(cfg)
    return MoedslError(
        f"Cholesky factorization of {what} failed for every damping tried "
        f"(damp_percent {tried[0]:g} to {tried[-1]:g}); the Hessian is not positive definite "
        "even when heavily damped (non-finite or corrupted calibration statistics?)",
        code="gptq",
    )


def check_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    if W.dim() != 2:
        raise MoedslError(f"GPTQ expects a 2-D weight [out, in], got shape {tuple(W.shape)}", code="gptq")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise MoedslError(
            f"Hessian shape {tuple(H.shape)} does not match the weight's {n} input columns", code="gptq"
        )
    check_finite(W, H)


def check_finite(W: torch.Tensor, H: torch.Tensor) -> None:
    # both checks in one transfer: each would make the caller wait for the device
    w_ok, h_ok = torch.stack([torch.isfinite(W).all(), torch.isfinite(H).all().to(W.device)]).tolist()
    if not w_ok:
        raise MoedslError("weight contains NaN or infinite values", code="gptq")
    if not h_ok:
        raise MoedslError("Hessian contains NaN or infinite values", code="gptq")
