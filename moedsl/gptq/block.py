"""GPTQ's inner loop over the columns of one block, for a batch of matrices.

For each column i of the block, in order: quantize it on its grid, record the code and the
loss, and spread the rounding error over the block's remaining columns with row i of the
inverse-Hessian factor (the OBS update). Rows are independent, so the loop parallelizes over
rows and matrices; only the columns are sequential.

`solve_block` runs the plain torch loop (the reference: ~15 small kernels per column) or, on
CUDA, one Triton kernel per block that keeps each row tile in registers for all the block's
columns. The kernel uses round-to-nearest arithmetic op by op (no fused multiply-add), so it
reproduces the torch loop bit for bit. MOEDSL_NO_TRITON=1 forces the torch loop.
"""

from __future__ import annotations

import os

import torch

from moedsl.gptq.quantizer import dequantize, quantize

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


def solve_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """W1 [B, R, C] (updated in place), Hinv1 [B, C, C] upper triangular, scale/zero [B, R, C] per column.

    Returns Q1 (dequantized), codes (uint8) and Err1 (scaled errors), each [B, R, C], and each row's
    loss summed over the block's columns in column order, [B, R].
    """
    if W1.is_cuda and HAVE_TRITON and os.environ.get("MOEDSL_NO_TRITON") != "1":
        return _solve_block_triton(W1, Hinv1, scale, zero, maxq)
    return _solve_block_torch(W1, Hinv1, scale, zero, maxq)


def _solve_block_torch(W1, Hinv1, scale, zero, maxq):
    Q1 = torch.zeros_like(W1)
    codes = torch.zeros_like(W1, dtype=torch.uint8)
    Err1 = torch.zeros_like(W1)
    loss = torch.zeros_like(W1[:, :, 0])
    for i in range(W1.shape[2]):
        w = W1[:, :, i]
        d = Hinv1[:, i, i].unsqueeze(1)
        s, z = scale[:, :, i], zero[:, :, i]
        q_code = quantize(w, s, z, maxq)
        q = dequantize(q_code, s, z)
        codes[:, :, i] = q_code
        Q1[:, :, i] = q
        t = w - q
        loss += t**2 / d**2 / 2
        err = t / d
        W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
        Err1[:, :, i] = err
    return Q1, codes, Err1, loss


if HAVE_TRITON:

    @triton.jit
    def _block_kernel(W, H, S, Z, Q, C, E, L, R, NC, maxq,
                      sw_b, sw_r, sh_b, sh_r, ss_b, ss_r,
                      BR: tl.constexpr, BC: tl.constexpr):
        # One program: BR rows of one matrix, all the block's columns, held in registers. Column i's
        # value, code, error and loss are picked out of / merged into the tiles with masks, and the
        # tiles are stored once at the end, row-contiguous (storing a column at a time would write
        # one 4-byte value per 32-byte sector).
        pid_r = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_r * BR + tl.arange(0, BR)
        cols = tl.arange(0, BC)
        rmask = rows < R
        cmask = cols < NC
        tile = rows[:, None].to(tl.int64) * sw_r + cols[None, :]
        tmask = rmask[:, None] & cmask[None, :]
        w = tl.load(W + b * sw_b + tile, mask=tmask, other=0.0)
        q_all = tl.zeros((BR, BC), dtype=tl.float32)
        c_all = tl.zeros((BR, BC), dtype=tl.float32)
        e_all = tl.zeros((BR, BC), dtype=tl.float32)
        loss = tl.zeros((BR,), dtype=tl.float32)
        for i in range(0, NC):
            here = cols[None, :] == i
            wi = tl.sum(tl.where(here, w, 0.0), axis=1)
            grid = b * ss_b + rows.to(tl.int64) * ss_r + i  # the rows' grid lines sit in L1 after column 0
            s = tl.load(S + grid, mask=rmask, other=1.0)
            z = tl.load(Z + grid, mask=rmask, other=0.0)
            d = tl.load(H + b * sh_b + i * sh_r + i)
            code = libdevice.rint(libdevice.div_rn(wi, s)) + z
            code = tl.minimum(tl.maximum(code, 0.0), maxq)
            q = libdevice.mul_rn(s, libdevice.sub_rn(code, z))
            t = libdevice.sub_rn(wi, q)
            loss = libdevice.add_rn(loss, libdevice.div_rn(libdevice.div_rn(libdevice.mul_rn(t, t),
                                                                            libdevice.mul_rn(d, d)), 2.0))
            err = libdevice.div_rn(t, d)
            h = tl.load(H + b * sh_b + i * sh_r + cols, mask=cmask & (cols >= i), other=0.0)
            upd = libdevice.mul_rn(err[:, None], h[None, :])
            w = tl.where(cols[None, :] >= i, libdevice.sub_rn(w, upd), w)
            q_all = tl.where(here, q[:, None], q_all)
            c_all = tl.where(here, code[:, None], c_all)
            e_all = tl.where(here, err[:, None], e_all)
        out = b * sw_b + tile
        tl.store(W + out, w, mask=tmask)
        tl.store(Q + out, q_all, mask=tmask)
        tl.store(C + out, c_all.to(tl.uint8), mask=tmask)
        tl.store(E + out, e_all, mask=tmask)
        tl.store(L + b * R + rows, loss, mask=rmask)


def _solve_block_triton(W1, Hinv1, scale, zero, maxq):
    W1c = W1.contiguous()
    B, R, NC = W1c.shape
    H = Hinv1.contiguous()
    S = scale.contiguous()
    Z = zero.contiguous()
    Q1 = torch.empty_like(W1c)
    codes = torch.empty_like(W1c, dtype=torch.uint8)
    Err1 = torch.empty_like(W1c)
    loss = torch.empty(B, R, device=W1c.device, dtype=W1c.dtype)
    BC = max(16, triton.next_power_of_2(NC))
    BR = 32 if BC <= 64 else 16
    grid = (triton.cdiv(R, BR), B)
    _block_kernel[grid](W1c, H, S, Z, Q1, codes, Err1, loss, R, NC, float(maxq),
                        W1c.stride(0), W1c.stride(1), H.stride(0), H.stride(1), S.stride(0), S.stride(1),
                        BR=BR, BC=BC, num_warps=4)
    if W1c.data_ptr() != W1.data_ptr():
        W1.copy_(W1c)
    return Q1, codes, Err1, loss


def warm_up(device: torch.device, columns: int = 128) -> None:
    """Compile (or load from Triton's cache) the kernel for blocks of `columns` columns now, on a tiny
    problem: the run calls this on a background thread while it builds the model skeleton, so the
    first layer's first solve does not wait for the compiler."""
    if not (HAVE_TRITON and device.type == "cuda" and os.environ.get("MOEDSL_NO_TRITON") != "1"):
        return
    B, R = 1, 32
    W = torch.zeros(B, R, columns, device=device)
    H = torch.eye(columns, device=device)[None]
    S = torch.ones(B, R, columns, device=device)
    _solve_block_triton(W, H, S, torch.zeros_like(S), 15)
    torch.cuda.synchronize(device)
