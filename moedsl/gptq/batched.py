"""GPTQ for many matrices at once — the MoE fast path.

Two kinds of "many":

* shared: matrices that read the same input (every expert's gate and up under the
  all-experts policy, or q/k/v) have the same Hessian. GPTQ treats the rows of W
  independently once H is fixed (the error of row r only ever updates row r), so their rows
  are stacked into one tall matrix and solved once: one Cholesky, one sweep.
* batched: same-shape matrices with different Hessians (every expert's down projection)
  are solved along a leading batch axis: one batched Cholesky, one sweep over the columns
  with every operation covering all members. Only members whose factorization fails are
  retried with more damping.

Both give what solving each matrix alone with `gptq_quantize` gives, up to fp32 rounding
(the matmuls are the same but may sum in another order). Device-agnostic: all work happens
on the weights' device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.block import solve_block
from moedsl.gptq.gptq import (PreparedHessian, block_grid, check_finite, damp_error, damp_schedule, gptq_solve,
                              lazy_factor, solve_block_width, upper_factor_of_inverse)
from moedsl.gptq.quantizer import QuantConfig, QuantResult, find_params, group_grids
from moedsl.precision import tf32


def gptq_quantize_shared(
    Ws: Sequence[torch.Tensor] | torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grid=find_params,
    prepared: PreparedHessian | None = None,
) -> list[QuantResult]:
    """Quantize several matrices [out_i, in] (a list, or one tensor [B, out, in]) that share H.

    prepared: `prepare_hessian(H, cfg)`, when the caller solves more matrices against H in other calls."""
    if isinstance(Ws, torch.Tensor):
        if Ws.dim() != 3:
            raise MoedslError(f"expected [B, out, in] weights, got shape {tuple(Ws.shape)}", code="gptq")
        sizes = [Ws.shape[1]] * Ws.shape[0]
        stacked = Ws.reshape(-1, Ws.shape[2])
    else:
        mats = list(Ws)
        if not mats:
            return []
        for m in mats:
            if m.dim() != 2 or m.shape[1] != mats[0].shape[1]:
                raise MoedslError(
                    "matrices sharing a Hessian must all be 2-D with the same number of input columns; "
                    f"got shapes {[tuple(x.shape) for x in mats]}",
                    code="gptq",
                )
        sizes = [m.shape[0] for m in mats]
        # gptq_solve takes its own fp32 copy; concatenating one matrix would only copy it once more
        stacked = mats[0] if len(mats) == 1 else torch.cat([m.to(device=mats[0].device, dtype=torch.float32) for m in mats])

    whole, row_losses = gptq_solve(stacked, H, cfg, grid, prepared)
    # every matrix's loss in one transfer: a float per matrix would wait for the device once per matrix
    losses = torch.stack([part.sum() for part in row_losses.split(sizes)]).tolist()
    out = []
    start = 0
    for n, loss in zip(sizes, losses):
        rows = slice(start, start + n)
        out.append(
            QuantResult(
                weight=whole.weight[rows],
                codes=whole.codes[rows],
                scales=whole.scales[rows],
                zeros=whole.zeros[rows],
                g_idx=whole.g_idx,
                loss=loss,
                damp=whole.damp,
            )
        )
        start += n
    return out


def gptq_quantize_batched(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grid=find_params) -> list[QuantResult]:
    """Quantize W [B, out, in], member b against its own Hessian H[b] [in, in]."""
    with tf32(False):  # GPTQ needs true fp32 whatever the caller set (moedsl/precision.py)
        return _gptq_quantize_batched(W, H, cfg, grid)


def _gptq_quantize_batched(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grid) -> list[QuantResult]:
    if W.dim() != 3 or H.dim() != 3 or H.shape[0] != W.shape[0]:
        raise MoedslError(
            f"batched GPTQ expects W [B, out, in] and H [B, in, in]; got {tuple(W.shape)} and {tuple(H.shape)}",
            code="gptq",
        )
    if H.shape[1:] != (W.shape[2], W.shape[2]):
        raise MoedslError(
            f"Hessian shape {tuple(H.shape)} does not match the weights' {W.shape[2]} input columns", code="gptq"
        )
    check_finite(W, H)
    W = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)
    B, rows, columns = W.shape
    maxq = cfg.maxq
    if B == 0:
        return []

    # Dead inputs, per member (see gptq.py).
    dead = H.diagonal(dim1=1, dim2=2) == 0
    H.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(1), 0)

    width = cfg.group_width(columns)
    fixed_grids = cfg.group_size == -1 or cfg.static_groups
    n_groups = cfg.n_groups(columns)
    if fixed_grids:
        scales, zeros = group_grids(W, cfg, grid)  # [B, rows, G]
    else:
        scales = torch.zeros(B, rows, n_groups, device=W.device)
        zeros = torch.zeros(B, rows, n_groups, device=W.device)

    if cfg.act_order:
        perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)  # [B, cols]
        W = W.gather(2, perm.unsqueeze(1).expand(B, rows, columns))
        H = H.gather(1, perm.unsqueeze(2).expand(B, columns, columns))
        H = H.gather(2, perm.unsqueeze(1).expand(B, columns, columns))
    else:
        perm = torch.arange(columns, device=W.device).expand(B, columns)

    Hinv, damps = batched_inverse_hessian_factor(H, cfg)
    block = solve_block_width(cfg, columns)
    factor = lazy_factor(Hinv, cfg)  # the lazy updates' product on tensor cores, at fp32 accuracy (lazy.py)

    if fixed_grids:
        group_of = perm // width  # [B, cols], differs between members under act_order
    else:
        group_of = (torch.arange(columns, device=W.device) // width).expand(B, columns)
    per_member_groups = fixed_grids and cfg.act_order
    if per_member_groups:
        # Static groups under act_order: each member visits the groups in its own order, so
        # lay its grid out per column once instead of gathering at every step.
        col_index = group_of.unsqueeze(1).expand(B, rows, columns)
        col_scales = scales.gather(2, col_index)
        col_zeros = zeros.gather(2, col_index)

    # column-major underneath: the block kernel stores each column of every row into them, no copy per block
    Q = torch.empty(B, columns, rows, device=W.device).transpose(1, 2)
    codes = torch.empty(B, columns, rows, device=W.device, dtype=torch.uint8).transpose(1, 2)
    losses = torch.zeros(B, rows, device=W.device)

    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        if not fixed_grids and i1 % width == 0:
            g = i1 // width
            scales[:, :, g], zeros[:, :, g] = grid(W[:, :, i1 : i1 + width], cfg.bits, cfg.sym,
                                                          cfg.torch_scale_dtype)
        if per_member_groups:
            scale1, zero1 = col_scales[:, :, i1:i2], col_zeros[:, :, i1:i2]
        else:
            scale1, zero1 = block_grid(scales, zeros, group_of[0], i1, i2, width, moved=False)
        _, _, Err1, loss1 = solve_block(W[:, :, i1:i2], Hinv[:, i1:i2, i1:i2], scale1, zero1, maxq, factor.split,
                                        out=(Q[:, :, i1:i2], codes[:, :, i1:i2]))
        losses += loss1
        factor.update_(W, Err1, i1, i2)

    inv = torch.argsort(perm, dim=1)
    if cfg.act_order:
        inv_cols = inv.unsqueeze(1).expand(B, rows, columns)
        Q = Q.gather(2, inv_cols)
        codes = codes.gather(2, inv_cols)
    g_idx = group_of.gather(1, inv).to(torch.int32)
    zeros = zeros.to(torch.int32)
    member_loss = losses.sum(dim=1).tolist()
    return [
        QuantResult(
            weight=Q[b],
            codes=codes[b],
            scales=scales[b],
            zeros=zeros[b],
            g_idx=g_idx[b],
            loss=member_loss[b],
            damp=damps[b],
        )
        for b in range(B)
    ]


def batched_inverse_hessian_factor(H: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, list[float]]:
    """Upper Cholesky factors of (H[b] + λ_b I)⁻¹; only failing members get more damping."""
    B, n, _ = H.shape
    mean_diag = H.diagonal(dim1=1, dim2=2).mean(dim=1)
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    U = torch.empty_like(H)
    damps: list[float] = [0.0] * B
    todo = torch.arange(B, device=H.device)
    for attempt in damp_schedule(cfg):
        U1, info = upper_factor_of_inverse(H[todo] + (attempt * mean_diag[todo])[:, None, None] * eye)
        ok = (info == 0) & torch.isfinite(U1).flatten(1).all(dim=1)
        done = ok.nonzero().squeeze(1)
        if done.numel():
            U[todo[done]] = U1[done]
            for b in todo[done].tolist():
                damps[b] = attempt
        todo = todo[~ok]
        if todo.numel() == 0:
            return U, damps
    raise damp_error(cfg, f"the Hessian of batch member(s) {todo.tolist()}")
