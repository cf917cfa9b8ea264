"""GPTQ's inner loop over the columns of one block, for a batch of matrices.

For each column i of the block, in order: quantize it on its grid, record the code and the
loss, and spread the rounding error over the block's remaining columns with row i of the
inverse-Hessian factor (the OBS update). Rows are independent, so the loop parallelizes over
rows and matrices; only the columns are sequential.

`solve_block` runs the plain torch loop (the reference: ~15 small kernels per column) or, on
CUDA, one kernel per block that gives each GPU thread one row, held in registers for all the
block's columns. The kernel is written in Gluon (Triton's layout-explicit dialect) because the
layout is the point: Triton's own choice spread a row's 128 columns over all 128 threads of a
program, so picking column i out of the tile was a reduction through shared memory with a
barrier, and the per-row arithmetic (two correctly rounded divisions) ran redundantly on every
thread, at every column. With a row per thread and the column loop unrolled at compile time,
picking column i is a register read, and the update of the later columns touches only those.
It uses round-to-nearest arithmetic op by op (no fused multiply-add), so it reproduces the torch
loop bit for bit. MOEDSL_NO_TRITON=1 forces the torch loop. When the lazy update runs split on tensor cores
(lazy.py), the kernel also writes the errors in that update's layout, [E_hi | E_hi | E_lo], with the same
integer and fp32 operations as `split_tf32`, so the update reads them as they are.
"""

from __future__ import annotations

import os

import torch

from moedsl.gptq.lazy import split_errors as split_layout
from moedsl.gptq.lazy import splits_on
from moedsl.gptq.quantizer import dequantize, quantize

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs, or a Triton without Gluon (before 3.4)
    HAVE_TRITON = False


def solve_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                split_errors: bool = False, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """W1 [B, R, C] (read, not changed), Hinv1 [B, C, C] upper triangular, scale/zero [B, R, C] per column
    (views are fine: a block in one group passes its grid line expanded over the columns).

    Returns Q1 (dequantized), codes (uint8) and Err1 (scaled errors), each [B, R, C] (on CUDA, transposed
    views of column-major results), and each row's loss summed over the block's columns in column order, [B, R].
    With split_errors, Err1 is [B, R, 3C]: the errors as the split lazy update takes them (lazy.split_errors).
    out: (Q, codes) [B, R, C] views that Q1 and the codes are written into, and returned as: the block's
    columns of the solve's whole outputs. Where their rows are contiguous (the outputs column-major
    underneath), the kernel stores into them directly, with no copy per block.
    """
    if W1.is_cuda and HAVE_TRITON and os.environ.get("MOEDSL_NO_TRITON") != "1":
        return _solve_block_triton(W1, Hinv1, scale, zero, maxq, split_errors, out)
    Q1, codes, Err1, loss = _solve_block_torch(W1, Hinv1, scale, zero, maxq)
    if out is not None:
        out[0].copy_(Q1)
        out[1].copy_(codes)
        Q1, codes = out
    return Q1, codes, split_layout(Err1) if split_errors else Err1, loss


def _solve_block_torch(W1, Hinv1, scale, zero, maxq):
    W1 = W1.clone()
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

    # No specialization on the integer arguments' values or the pointers' alignment: each variant is
    # a fresh compile of an unrolled kernel (tens of seconds at 128 columns), and the row counts,
    # strides and grid offsets of a run's solves differ from one matrix to the next.
    @gluon.jit(do_not_specialize=["R", "sw_b", "sw_r", "sh_b", "sh_r", "ss_b", "ss_r", "ss_c",
                                  "sq_b", "sq_c", "sc_b", "sc_c"],
               do_not_specialize_on_alignment=["W", "H", "S", "Z", "QT", "CT"])
    def _block_kernel(W, H, S, Z, QT, CT, ET, L, R, maxq,
                      sw_b, sw_r, sh_b, sh_r, ss_b, ss_r, ss_c, sq_b, sq_c, sc_b, sc_c,
                      NC: gl.constexpr, BC: gl.constexpr, SPLIT: gl.constexpr):
        # One program: 32 rows per warp, a row per thread, its NC columns in the thread's registers
        # (BC: NC rounded up to a power of two). The column loop is unrolled, so column i of the
        # tile is a known register and `cols > i` a known set of them. QT, CT: the block's first
        # column of Q and the codes, rows contiguous (batch and column strides sq_*, sc_*). SPLIT: ET is
        # [B, 3·NC, R], the error's TF32 high part in rows i and NC + i, the rest in row 2·NC + i (lazy.py).
        num_warps: gl.constexpr = gl.num_warps()
        layout: gl.constexpr = gl.BlockedLayout([1, BC], [32, 1], [num_warps, 1], [1, 0])
        per_row: gl.constexpr = gl.SliceLayout(1, layout)
        per_col: gl.constexpr = gl.SliceLayout(0, layout)
        BR: gl.constexpr = 32 * num_warps
        b = gl.program_id(1).to(gl.int64)
        rows = gl.program_id(0) * BR + gl.arange(0, BR, layout=per_row)
        cols = gl.arange(0, BC, layout=per_col)
        rmask = rows < R
        w = gl.load(W + b * sw_b + rows[:, None].to(gl.int64) * sw_r + cols[None, :],
                    mask=rmask[:, None] & (cols[None, :] < NC), other=0.0)
        loss = gl.zeros([BR], gl.float32, per_row)
        grid = S + b * ss_b + rows.to(gl.int64) * ss_r  # each row's grid line (L1-resident after column 0)
        zgrid = Z + b * ss_b + rows.to(gl.int64) * ss_r
        # a warp stores column i of its 32 rows contiguously
        qout = b * sq_b + rows
        cout = b * sc_b + rows
        if SPLIT:  # ET [B, 3·NC, R]
            eout = b * 3 * NC * R + rows
        else:  # ET [B, NC, R]
            eout = b * NC * R + rows
        for i in gl.static_range(NC):
            wi = gl.sum(gl.where(cols[None, :] == i, w, -0.0), axis=1)  # folds to the register: x + -0.0 == x
            s = gl.load(grid + i * ss_c, mask=rmask, other=1.0)
            z = gl.load(zgrid + i * ss_c, mask=rmask, other=0.0)
            d = gl.load(H + b * sh_b + i * sh_r + i)
            code = libdevice.rint(libdevice.div_rn(wi, s)) + z
            code = gl.minimum(gl.maximum(code, 0.0), maxq)
            q = libdevice.mul_rn(s, libdevice.sub_rn(code, z))
            t = libdevice.sub_rn(wi, q)
            loss = libdevice.add_rn(loss, libdevice.div_rn(libdevice.div_rn(libdevice.mul_rn(t, t),
                                                                            libdevice.mul_rn(d, d)), 2.0))
            err = libdevice.div_rn(t, d)
            gl.store(QT + qout + i * sq_c, q, mask=rmask)
            gl.store(CT + cout + i * sc_c, code.to(gl.uint8), mask=rmask)
            if SPLIT:  # split_tf32: round to 10 significand bits on the bit pattern; the rest is exact in fp32
                hi = ((err.to(gl.int32, bitcast=True) + 4096) & -8192).to(gl.float32, bitcast=True)
                gl.store(ET + eout + i * R, hi, mask=rmask)
                gl.store(ET + eout + (NC + i) * R, hi, mask=rmask)
                gl.store(ET + eout + (2 * NC + i) * R, libdevice.sub_rn(err, hi), mask=rmask)
            else:
                gl.store(ET + eout + i * R, err, mask=rmask)
            if i + 1 < NC:  # the OBS update of the later columns (column i itself is never read again)
                later = (cols > i) & (cols < NC)
                h = gl.load(H + b * sh_b + i * sh_r + cols, mask=later, other=0.0)
                w = gl.where(later[None, :], libdevice.sub_rn(w, libdevice.mul_rn(err[:, None], h[None, :])), w)
        gl.store(L + b * R + rows, loss, mask=rmask)


def _solve_block_triton(W1, Hinv1, scale, zero, maxq, split_errors=False, out=None):
    B, R, NC = W1.shape
    if W1.stride(2) != 1:
        W1 = W1.contiguous()
    if Hinv1.stride(2) != 1:  # a factor straight from a triangular solve can be column-major
        Hinv1 = Hinv1.contiguous()
    S, Z = scale, zero  # one set of strides for both (expanded views of one group's line, or gathered)
    if S.stride() != Z.stride():
        S, Z = S.contiguous(), Z.contiguous()
    direct = out is not None and out[0].stride(1) == 1 and out[1].stride(1) == 1
    if direct:
        Q1, C1 = out
    else:  # [B, R, NC] views of column-major results
        Q1 = torch.empty(B, NC, R, device=W1.device, dtype=torch.float32).transpose(1, 2)
        C1 = torch.empty(B, NC, R, device=W1.device, dtype=torch.uint8).transpose(1, 2)
    ET = torch.empty(B, 3 * NC if split_errors else NC, R, device=W1.device, dtype=torch.float32)
    loss = torch.empty(B, R, device=W1.device, dtype=torch.float32)
    num_warps = 1  # 32 rows a program: enough programs to fill the device even for a few thousand rows
    grid = (triton.cdiv(R, 32 * num_warps), B)
    _block_kernel[grid](W1, Hinv1, S, Z, Q1, C1, ET, loss, R, float(maxq),
                        W1.stride(0), W1.stride(1), Hinv1.stride(0), Hinv1.stride(1),
                        S.stride(0), S.stride(1), S.stride(2), Q1.stride(0), Q1.stride(2), C1.stride(0), C1.stride(2),
                        NC=NC, BC=triton.next_power_of_2(NC), SPLIT=split_errors, num_warps=num_warps)
    if out is not None and not direct:
        out[0].copy_(Q1)
        out[1].copy_(C1)
        Q1, C1 = out
    return Q1, C1, ET.transpose(1, 2), loss


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
    _solve_block_triton(W, H, S, torch.zeros_like(S), 15, split_errors=splits_on(device))
    torch.cuda.synchronize(device)
