"""The packer stage: every matrix of a stack packed in one pass, on the CPU and (when present) the
GPU, read back by the independent unpacker (tests/unpack_reference.py) and equal byte for byte
to the one-matrix writers. The reference reader recovers every code and grid, and padding bits
are zero, so agreeing with it pins down every stored byte."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moedsl.errors import MoedslError
from moedsl.execute.packer import Packer
from moedsl.gptq.quantizer import QuantConfig, QuantStack, rtn_quantize
from moedsl.write import CheckpointWriter, ct_tensors, gptq_tensors
from moedsl.write.pack import pack_last, packed_length

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_ct, dequantize_gptq, unpack_ct, unpack_gptq_axis0  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N, OUT, IN = 5, 64, 96  # five experts of one target


def _results(cfg: QuantConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [rtn_quantize(torch.randn(OUT, IN, generator=g), cfg) for _ in range(N)]


def _stored(tmp_path, fmt, cfg, device, bias, **writer_kw):
    results = _results(cfg, seed=cfg.bits)
    writer = CheckpointWriter(tmp_path / fmt, fmt, cfg, **writer_kw)
    names = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(N)]
    stack = QuantStack.of(results, bias).to(device)
    packed = Packer(writer, torch.bfloat16).pack(names, stack, expert=True)
    assert packed.buffer.device.type == "cpu"
    return results, names, dict(packed.modules())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,sym,fmt_version", [(2, True, "gptq"), (3, True, "gptq"), (4, True, "gptq"),
                                                  (8, True, "gptq"), (4, False, "gptq_v2"), (3, False, "gptq_v2")])
def test_gptq_stack_matches_reference_and_single_writer(tmp_path, device, bits, sym, fmt_version):
    cfg = QuantConfig(bits=bits, group_size=32, sym=sym)
    bias = torch.randn(N, OUT, generator=torch.Generator().manual_seed(9))
    results, names, modules = _stored(tmp_path, "gptq", cfg, device, bias, gptq_checkpoint_format=fmt_version)
    qc = {"bits": bits, "checkpoint_format": fmt_version}
    for e, (name, r) in enumerate(zip(names, results)):
        tensors = {f"{name}.{k}": v for k, v in modules[name].items()}
        read = dequantize_gptq(tensors, name, qc)
        np.testing.assert_array_equal(read["codes"], r.codes.numpy().astype(np.int64))
        np.testing.assert_array_equal(read["zeros"], r.zeros.numpy())
        np.testing.assert_array_equal(read["weight"], r.weight.numpy())
        single = gptq_tensors(name, r, cfg, bias[e], torch.bfloat16, fmt_version)
        assert single.keys() == modules[name].keys()
        for k, v in single.items():
            assert v.dtype == modules[name][k].dtype and v.shape == modules[name][k].shape, k
            assert torch.equal(v, modules[name][k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False), (8, False)])
def test_ct_stack_matches_reference_and_single_writer(tmp_path, device, bits, sym):
    cfg = QuantConfig(bits=bits, group_size=32, sym=sym, scale_dtype="bfloat16")
    results, names, modules = _stored(tmp_path, "compressed-tensors", cfg, device, None) if sym else (None, None, None)
    if not sym:  # experts must be symmetric in compressed-tensors; a shared expert need not be
        results = _results(cfg, seed=bits)
        writer = CheckpointWriter(tmp_path / "ct", "compressed-tensors", cfg)
        names = [f"model.layers.0.mlp.shared.{e}" for e in range(N)]
        packed = Packer(writer, torch.bfloat16).pack(names, QuantStack.of(results).to(device), expert=False)
        modules = dict(packed.modules())
        with pytest.raises(MoedslError, match="asymmetrically"):
            Packer(writer, torch.bfloat16).pack(names, QuantStack.of(results).to(device), expert=True)
    qc = {"config_groups": {"g": {"weights": {"num_bits": bits, "strategy": "group", "group_size": 32,
                                              "symmetric": sym}}}}
    for name, r in zip(names, results):
        tensors = {f"{name}.{k}": v for k, v in modules[name].items()}
        read = dequantize_ct(tensors, name, qc)
        np.testing.assert_array_equal(read["codes"], r.codes.numpy().astype(np.int64))
        np.testing.assert_array_equal(read["zeros"], r.zeros.numpy())
        single = ct_tensors(name, r, cfg, torch.bfloat16, None, expert=False)
        assert single.keys() == modules[name].keys()
        for k, v in single.items():
            assert torch.equal(v, modules[name][k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_last_any_rank_and_padding(device, bits):
    """Packing along the last axis of a [3, 4, n] tensor equals packing each row, with zero padding bits."""
    g = torch.Generator().manual_seed(bits)
    for n in (32, 37, 96):
        values = torch.randint(0, 2**bits, (3, 4, n), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack_last(values.to(device), bits).cpu()
        assert packed.dtype == torch.int32 and packed.shape == (3, 4, packed_length(n, bits))
        rows = packed.reshape(12, -1)
        for r, row in enumerate(values.reshape(12, n)):
            if bits in (4, 8):
                np.testing.assert_array_equal(unpack_ct(rows[r:r + 1], bits, n)[0], row.numpy())
            if bits in (2, 3, 4, 8) and n % 32 == 0:
                np.testing.assert_array_equal(unpack_gptq_axis0(rows[r][:, None].contiguous(), bits, n)[:, 0],
                                              row.numpy())
            used = n * bits - 32 * (rows.shape[1] - 1)  # bits used in the last word
            if used < 32:
                assert (int(rows[r, -1]) & 0xFFFFFFFF) >> used == 0


def test_stack_errors_name_the_matrix(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    results = _results(cfg)
    stack = QuantStack.of(results)
    bad = QuantStack(stack.codes.clone(), stack.scales, stack.zeros, stack.g_idx)
    bad.codes[3, 0, 0] = 16
    names = [f"experts.{e}.up_proj" for e in range(N)]
    writer = CheckpointWriter(tmp_path, "gptq", cfg)
    with pytest.raises(MoedslError, match=r"cannot write `experts\.3\.up_proj`: codes must lie in \[0, 15\]"):
        writer.pack_stack(names, bad)
    scales = stack.scales.clone()
    scales[2, 1, 0] = float("nan")
    with pytest.raises(MoedslError, match=r"`experts\.2\.up_proj`: scales must be finite"):
        writer.pack_stack(names, QuantStack(stack.codes, scales, stack.zeros, stack.g_idx))
    with pytest.raises(MoedslError, match=r"`experts\.0\.up_proj`: bias shape"):
        writer.pack_stack(names, QuantStack(stack.codes, stack.scales, stack.zeros, stack.g_idx, torch.zeros(N, 3)))
