"""GPTQ's lazy-batch update on tensor cores (moedsl/gptq/lazy.py): the 3×TF32 split is exact, and the
split product equals the fp32 one to well under fp32's own rounding of a 128-term sum of products."""

from __future__ import annotations

import pytest
import torch

from moedsl.gptq.lazy import SplitFactor, split_errors, split_tf32


def test_split_is_exact_and_its_high_part_fits_tf32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    x[:3] = torch.tensor([0.0, -0.0, 1.0])
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)  # no rounding: lo is exact in fp32
    assert torch.all(hi.view(torch.int32) & ((1 << 13) - 1) == 0)  # 10 significand bits: exact in TF32
    assert torch.all(lo.abs() <= x.abs() * 2.0**-11)  # rounded, not truncated
    assert torch.equal(hi[:3], x[:3]) and torch.all(lo[:3] == 0)


@pytest.mark.parametrize("batched", [False, True])
def test_split_update_equals_the_fp32_update(batched):
    g = torch.Generator().manual_seed(1)
    shape = (3, 64, 512) if batched else (64, 512)
    W = torch.randn(*shape, generator=g)
    U = torch.randn(*shape[:-2], 512, 512, generator=g).triu() / 20
    Err = torch.randn(*shape[:-1], 128, generator=g)
    exact = W.double()
    exact[..., 256:] -= Err.double() @ U.double()[..., 128:256, 256:]
    plain, split = W.clone(), W.clone()
    SplitFactor(U, 128, split=False).update_(plain, Err, 128, 256)
    factor = SplitFactor(U, 128, split=True)
    factor.update_(split, split_errors(Err), 128, 256)
    assert torch.equal(split[..., :256], W[..., :256])  # the columns before i2 are left alone
    scale = exact[..., 256:].abs().max()
    plain_err = ((plain.double() - exact).abs().max() / scale).item()
    split_err = ((split.double() - exact).abs().max() / scale).item()
    assert split_err < 2e-6, (split_err, plain_err)  # fp32 level (eps 6e-8, sums of 384 terms); TF32 alone: 1e-3
    before = split.clone()
    factor.update_(split, split_errors(Err), 384, 512)  # the last block updates nothing
    assert torch.equal(split, before)


def test_split_operands_are_the_split_parts_in_place():
    """The factor's right operand of a block is [U_hi ; U_lo ; U_hi] over its rows and the later columns, and
    the error's left operand [E_hi | E_hi | E_lo]: their product is the three TF32 products the split keeps."""
    g = torch.Generator().manual_seed(2)
    U = torch.randn(2, 200, 200, generator=g).triu()
    factor = SplitFactor(U, 64, split=True)
    assert sorted(factor.right) == [0, 64, 128]  # no operand for the last block (192..200 updates nothing)
    hi, lo = split_tf32(U)
    assert torch.equal(factor.right[64], torch.cat([hi[:, 64:128, 128:], lo[:, 64:128, 128:], hi[:, 64:128, 128:]], 1))
    assert factor.right[128].shape == (2, 3 * 64, 200 - 192)
    Err = torch.randn(2, 5, 64, generator=g)
    e_hi, e_lo = split_tf32(Err)
    assert torch.equal(split_errors(Err), torch.cat([e_hi, e_hi, e_lo], -1))


def test_gptq_with_split_updates_on_the_cpu_matches_the_fp32_solve():
    """The whole split path (the errors' layout, the factor's operands) inside a GPTQ solve, on the CPU (no TF32 here,
    so each of the three products is fp32): the same codes as the plain solve but for rare one-step flips."""
    import dataclasses

    from moedsl.gptq.gptq import gptq_solve, prepare_hessian
    from moedsl.gptq.quantizer import QuantConfig

    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 1100, generator=g)
    X = torch.randn(4000, 1100, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    for cfg in (QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=-1, act_order=True)):
        prepared = prepare_hessian(H, cfg)
        assert not prepared.factor.split  # the CPU's default
        forced = dataclasses.replace(prepared, factor=SplitFactor(prepared.Hinv, 128, split=True))
        plain, _ = gptq_solve(W, H, cfg, prepared=prepared)
        split, _ = gptq_solve(W, H, cfg, prepared=forced)
        flipped = (plain.codes != split.codes).float().mean().item()
        assert flipped < 1e-3, flipped
        assert (plain.codes.int() - split.codes.int()).abs().max() <= 1
        assert abs(plain.loss - split.loss) <= 1e-4 * abs(plain.loss)
