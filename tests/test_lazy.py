"""GPTQ's lazy-batch update on tensor cores (moedsl/gptq/lazy.py): the 3×TF32 split is exact, and the
split product equals the fp32 one to well under fp32's own rounding of a 128-term sum of products."""

from __future__ import annotations

import pytest
import torch

from moedsl.gptq.lazy import SplitFactor, split_tf32


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
    SplitFactor(U, split=False).update_(plain, Err, 128, 256)
    SplitFactor(U, split=True).update_(split, Err, 128, 256)
    assert torch.equal(split[..., :256], W[..., :256])  # the columns before i2 are left alone
    scale = exact[..., 256:].abs().max()
    plain_err = ((plain.double() - exact).abs().max() / scale).item()
    split_err = ((split.double() - exact).abs().max() / scale).item()
    assert split_err < 2e-6, (split_err, plain_err)  # fp32 level (eps 6e-8, sums of 384 terms); TF32 alone: 1e-3
    SplitFactor(U, split=True).update_(split, Err, 384, 512)  # the last block updates nothing
