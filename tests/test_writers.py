"""Checkpoint writers: write quantized layers, read them back with an independent reader
(tests/unpack_reference.py, and compressed-tensors itself when installed), and require the
dequantized weights to equal the quantizer's own result bit for bit."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moedsl.errors import MoedslError
from moedsl.gptq import QuantConfig, QuantResult, gptq_quantize, rtn_quantize
from moedsl.write import CheckpointWriter, pack, required_scale_dtype, unpack

sys.path.insert(0, str(Path(__file__).parent))
from unpack_reference import dequantize_ct, dequantize_gptq, read_checkpoint, unpack_ct, unpack_gptq_axis0  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

OUT, IN = 64, 256




def hessian(seed: int, n: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / math.sqrt(n))
    return X.T @ X


H = hessian(0)


def quantized(cfg: QuantConfig, seed: int, out: int = OUT, n: int = IN) -> tuple[torch.Tensor, QuantResult]:
    W = torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    return W, gptq_quantize(W, H if n == IN else hessian(1, n), cfg)


def write_one(tmp_path, fmt, cfg, result, *, dtype=torch.float16, bias=None, name="model.layers.0.mlp.down_proj", **kw):
    writer = CheckpointWriter(tmp_path, fmt, cfg, **kw)
    writer.add_quantized(name, result, bias=bias, dtype=dtype)
    writer.add_tensor("model.layers.0.input_layernorm.weight", torch.ones(IN, dtype=dtype))
    writer.flush_shard("layer-00000.safetensors")
    writer.add_tensor("lm_head.weight", torch.zeros(8, IN, dtype=dtype))
    writer.flush_shard("rest.safetensors")
    writer.finalize({"model_type": "toy", "hidden_size": IN})
    return read_checkpoint(tmp_path), json.loads((tmp_path / "config.json").read_text())


def assert_matches(read: dict, result: QuantResult):
    np.testing.assert_array_equal(read["codes"], result.codes.numpy().astype(np.int64))
    np.testing.assert_array_equal(read["zeros"], result.zeros.numpy().astype(np.int64))
    # bit-for-bit: the dequantized checkpoint IS the weight GPTQ produced
    assert np.array_equal(read["weight"], result.weight.numpy())


# ---- GPTQ ---------------------------------------------------------------------------------

GPTQ_CASES = [
    (bits, sym, act, static, gs)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for act, static in ((False, False), (True, False), (True, True))
    for gs in (-1, 32, 128)
    if not (static and gs == -1)
]


@pytest.mark.parametrize("bits,sym,act_order,static_groups,group_size", GPTQ_CASES)
def test_gptq_roundtrip(tmp_path, bits, sym, act_order, static_groups, group_size):
    cfg = QuantConfig(bits=bits, sym=sym, act_order=act_order, static_groups=static_groups, group_size=group_size)
    _, result = quantized(cfg, seed=bits * 100 + group_size)
    bias = torch.randn(OUT).half()
    tensors, config = write_one(tmp_path, "gptq", cfg, result, bias=bias)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert config["quantization_config"] == qc
    assert qc["bits"] == bits and qc["group_size"] == group_size and qc["sym"] == sym
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["static_groups"] == static_groups and qc["true_sequential"] is True
    assert qc["desc_act"] == (act_order and group_size != -1 and not static_groups)
    assert qc["damp_percent"] == cfg.damp_percent

    prefix = "model.layers.0.mlp.down_proj"
    n_groups = cfg.n_groups(IN)
    assert tensors[f"{prefix}.qweight"].shape == (IN * bits // 32, OUT)
    assert tensors[f"{prefix}.qzeros"].shape == (n_groups, OUT * bits // 32)
    assert tensors[f"{prefix}.scales"].shape == (n_groups, OUT)
    assert torch.equal(tensors[f"{prefix}.bias"], bias)
    read = dequantize_gptq(tensors, prefix, qc)
    assert_matches(read, result)
    np.testing.assert_array_equal(read["g_idx"], result.g_idx.numpy())
    if not qc["desc_act"]:  # a loader that ignores g_idx must get the same weights
        assert np.array_equal(read["g_idx"], np.arange(IN) // cfg.group_width(IN))


def test_gptq_v1_symmetric_zero_words():
    """Well-known constants: symmetric 4-bit v1 qzeros are 0x77777777, 8-bit 0x7F7F7F7F."""
    from moedsl.write import gptq_tensors

    for bits, word in ((4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)):
        cfg = QuantConfig(bits=bits, group_size=128)
        _, result = quantized(cfg, seed=1)
        t = gptq_tensors("m", result, cfg)
        assert bool((t["qzeros"] == word).all())


def test_gptq_v2_and_zero_point_zero(tmp_path):
    """v1 cannot store a zero-point of 0 (it stores zero - 1); v2 can."""
    cfg = QuantConfig(bits=4, group_size=32, sym=False)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(3))
    W[:, :32] = W[:, :32].abs()  # group 0 all >= 0 -> zero-point 0
    result = rtn_quantize(W, cfg)
    assert int(result.zeros[:, 0].max()) == 0
    with pytest.raises(MoedslError, match="zero-points are 0"):
        CheckpointWriter(tmp_path / "v1", "gptq", cfg).add_quantized("m", result)
    tensors, config = write_one(tmp_path / "v2", "gptq", cfg, result, name="m", gptq_checkpoint_format="gptq_v2")
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert_matches(dequantize_gptq(tensors, "m", config["quantization_config"]), result)


# ---- compressed-tensors -------------------------------------------------------------------

CT_CASES = [
    (bits, sym, act, gs, dtype)
    for bits in (4, 8)
    for sym in (True, False)
    for act in (False, True)
    for gs in (-1, 32, 128)
    for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("bits,sym,act_order,group_size,dtype", CT_CASES)
def test_ct_roundtrip(tmp_path, bits, sym, act_order, group_size, dtype):
    cfg = QuantConfig(
        bits=bits,
        sym=sym,
        act_order=act_order,
        static_groups=act_order,  # compressed-tensors stores act_order only with static groups
        group_size=group_size,
        scale_dtype=required_scale_dtype("compressed-tensors", dtype),
    )
    _, result = quantized(cfg, seed=bits * 100 + group_size + 7)
    bias = torch.randn(OUT).to(dtype)
    tensors, config = write_one(tmp_path, "compressed-tensors", cfg, result, dtype=dtype, bias=bias)
    assert not (tmp_path / "quantize_config.json").exists()
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    args = qc["config_groups"]["group_0"]["weights"]
    assert args["num_bits"] == bits and args["symmetric"] == sym and args["type"] == "int"
    assert args["strategy"] == ("channel" if group_size == -1 else "group")
    assert args["actorder"] == ("weight" if act_order and group_size != -1 else None)
    assert qc["ignore"] == ["lm_head"]  # lm_head.weight was added unquantized

    prefix = "model.layers.0.mlp.down_proj"
    n_groups = cfg.n_groups(IN)
    assert tensors[f"{prefix}.weight_packed"].shape == (OUT, IN * bits // 32)
    assert tensors[f"{prefix}.weight_scale"].shape == (OUT, n_groups)
    assert tensors[f"{prefix}.weight_scale"].dtype == dtype
    assert torch.equal(tensors[f"{prefix}.weight_shape"], torch.tensor([OUT, IN]))
    assert (f"{prefix}.weight_zero_point" in tensors) == (not sym)
    if not sym:
        assert tensors[f"{prefix}.weight_zero_point"].shape == (math.ceil(OUT * bits / 32), n_groups)
    assert f"{prefix}.weight_g_idx" not in tensors
    assert torch.equal(tensors[f"{prefix}.bias"], bias)
    assert_matches(dequantize_ct(tensors, prefix, qc), result)
    decompress_with_compressed_tensors(tensors, prefix, qc, result, dtype)


def decompress_with_compressed_tensors(tensors, prefix, qc, result, dtype):
    """When the real library is installed, it must parse our config and decompress our tensors
    to the same weights (rounded to the model dtype, as it computes in the scale dtype)."""
    try:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in ("sparsity_config", "transform_config")})
    scheme = parsed.config_groups["group_0"]
    local = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    local.pop("bias", None)
    weight = PackedQuantizationCompressor.decompress(dict(local), scheme)["weight"]
    assert weight.dtype == dtype
    assert torch.equal(weight, result.weight.to(dtype))
    # and the library, compressing the same (fp32) weights and parameters, packs the same bits
    state = {"weight": result.weight, "weight_scale": result.scales.to(dtype)}
    if not scheme.weights.symmetric:
        state["weight_zero_point"] = (result.zeros - 2 ** (scheme.weights.num_bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert sorted(theirs) == sorted(local)
    for key, value in theirs.items():
        assert torch.equal(value, local[key]), key


def test_compressed_tensors_library():
    pytest.importorskip(
        "compressed_tensors",
        reason="compressed-tensors is not installed; the round-trip tests then use only tests/unpack_reference.py",
    )


def test_ct_refusals(tmp_path):
    with pytest.raises(MoedslError, match="4 or 8 bits"):
        CheckpointWriter(tmp_path, "compressed-tensors", QuantConfig(bits=3))
    with pytest.raises(MoedslError, match="act_order with dynamic groups"):
        CheckpointWriter(tmp_path, "compressed-tensors", QuantConfig(bits=4, group_size=32, act_order=True))
    cfg = QuantConfig(bits=4, group_size=32, sym=False, scale_dtype="bfloat16")
    _, result = quantized(cfg, seed=2)
    writer = CheckpointWriter(tmp_path, "compressed-tensors", cfg)
    with pytest.raises(MoedslError, match="MoE expert"):
        writer.add_quantized("model.layers.0.mlp.experts.0.up_proj", result, dtype=torch.bfloat16, expert=True)
    writer.add_quantized("model.layers.0.mlp.shared_expert.up_proj", result, dtype=torch.bfloat16)  # not an expert
    # float32 scales would be rounded when stored: refused, never silently changed
    cfg32 = QuantConfig(bits=4, group_size=32, scale_dtype="float32")
    _, result32 = quantized(cfg32, seed=2)
    with pytest.raises(MoedslError, match="not exactly representable in bfloat16"):
        CheckpointWriter(tmp_path / "f32", "compressed-tensors", cfg32).add_quantized("q", result32, dtype=torch.bfloat16)


def test_ct_act_order_per_channel_needs_no_static_groups(tmp_path):
    cfg = QuantConfig(bits=8, group_size=-1, act_order=True, scale_dtype="bfloat16")
    _, result = quantized(cfg, seed=5)
    tensors, config = write_one(tmp_path, "compressed-tensors", cfg, result, dtype=torch.bfloat16)
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] is None
    assert_matches(dequantize_ct(tensors, "model.layers.0.mlp.down_proj", config["quantization_config"]), result)


# ---- the checkpoint writer ----------------------------------------------------------------


def write_model(out_dir, fmt="gptq", seed=0):
    """A small two-layer MoE-ish checkpoint, written layer by layer."""
    cfg = QuantConfig(bits=4, group_size=32, act_order=True, static_groups=True)
    writer = CheckpointWriter(out_dir, fmt, cfg, ignore=["lm_head"])
    results = {}
    for layer in range(2):
        for expert in range(3):
            for proj in ("gate_proj", "up_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                results[name] = quantized(cfg, seed=seed + len(results), out=32)[1]
                writer.add_quantized(name, results[name], dtype=torch.float16, expert=True)
        writer.add_tensor(f"model.layers.{layer}.mlp.gate.weight", torch.full((3, IN), float(layer), dtype=torch.float16))
        writer.add_tensor(f"model.layers.{layer}.post_attention_layernorm.weight", torch.ones(IN, dtype=torch.float16))
        writer.flush_shard(f"layer-{layer:05d}.safetensors")
    writer.add_tensor("model.embed_tokens.weight", torch.arange(16 * IN, dtype=torch.float16).view(16, IN))
    writer.flush_shard("rest.safetensors")
    writer.finalize({"model_type": "toy", "torch_dtype": torch.float16}, {"generation_config.json": {"do_sample": False}, "README.md": "toy\n"})
    return results


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_streaming_model_and_index(tmp_path, fmt):
    results = write_model(tmp_path, fmt)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["layer-00000.safetensors", "layer-00001.safetensors", "rest.safetensors"]
    assert index["weight_map"]["model.layers.1.mlp.gate.weight"] == "layer-00001.safetensors"
    sizes = sum((tmp_path / s).stat().st_size for s in set(index["weight_map"].values()))
    assert 0 < index["metadata"]["total_size"] < sizes
    tensors = read_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["model_type"] == "toy"
    qc = config["quantization_config"]
    for name, result in results.items():
        read = dequantize_gptq(tensors, name, qc) if fmt == "gptq" else dequantize_ct(tensors, name, qc)
        assert_matches(read, result)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"do_sample": False}
    assert (tmp_path / "README.md").read_text() == "toy\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left
    if fmt == "compressed-tensors":
        assert qc["ignore"] == sorted(["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"])


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_deterministic_bytes(tmp_path, fmt):
    write_model(tmp_path / "a", fmt)
    write_model(tmp_path / "b", fmt)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_killed_flush_leaves_no_finished_looking_shard(tmp_path, monkeypatch):
    cfg = QuantConfig(bits=4, group_size=32)
    writer = CheckpointWriter(tmp_path, "gptq", cfg)
    writer.add_quantized("m", quantized(cfg, seed=1)[1])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.flush_shard("layer-00000.safetensors")
    assert not (tmp_path / "layer-00000.safetensors").exists()


def test_resume_adopts_finished_shards(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    first = CheckpointWriter(tmp_path, "gptq", cfg)
    r0 = quantized(cfg, seed=1)[1]
    first.add_quantized("model.layers.0.mlp.down_proj", r0)
    first.add_tensor("model.layers.0.mlp.gate.weight", torch.ones(4, IN))
    first.flush_shard("layer-00000.safetensors")
    # ... killed here. A new run adopts layer 0 and carries on.
    second = CheckpointWriter(tmp_path, "gptq", cfg)
    keys = second.adopt_shard("layer-00000.safetensors")
    assert "model.layers.0.mlp.down_proj.qweight" in keys and second.has_shard("layer-00000.safetensors")
    r1 = quantized(cfg, seed=2)[1]
    second.add_quantized("model.layers.1.mlp.down_proj", r1)
    second.flush_shard("layer-00001.safetensors")
    second.finalize({"model_type": "toy"})
    tensors = read_checkpoint(tmp_path)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert_matches(dequantize_gptq(tensors, "model.layers.0.mlp.down_proj", qc), r0)
    assert_matches(dequantize_gptq(tensors, "model.layers.1.mlp.down_proj", qc), r1)
    with pytest.raises(MoedslError, match="does not exist"):
        CheckpointWriter(tmp_path, "gptq", cfg).adopt_shard("layer-00009.safetensors")
    shard = tmp_path / "layer-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged since: a located error, not safetensors' own
    with pytest.raises(MoedslError, match=f"{shard} is not a readable safetensors file"):
        CheckpointWriter(tmp_path, "gptq", cfg).adopt_shard("layer-00001.safetensors")


def test_writer_bad_input(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    result = quantized(cfg, seed=1)[1]
    with pytest.raises(MoedslError, match="unknown checkpoint format"):
        CheckpointWriter(tmp_path, "awq", cfg)
    with pytest.raises(MoedslError, match="2, 3, 4 or 8 bits"):
        CheckpointWriter(tmp_path, "gptq", QuantConfig(bits=5))
    with pytest.raises(MoedslError, match="float16"):
        CheckpointWriter(tmp_path, "gptq", QuantConfig(bits=4, scale_dtype="bfloat16"))
    with pytest.raises(MoedslError, match="checkpoint_format"):
        CheckpointWriter(tmp_path, "gptq", cfg, gptq_checkpoint_format="gptq_v3")

    writer = CheckpointWriter(tmp_path, "gptq", cfg)
    with pytest.raises(MoedslError, match="without it") as info:
        writer.add_quantized("model.layers.0.mlp.down_proj.weight", result)
    assert info.value.suggestion == "model.layers.0.mlp.down_proj"
    writer.add_quantized("m", result)
    with pytest.raises(MoedslError, match="already added"):
        writer.add_quantized("m", result)
    with pytest.raises(MoedslError, match="already added"):
        writer.add_tensor("m.qweight", torch.zeros(1))
    # a result made with another config does not fit this one
    other = quantized(QuantConfig(bits=4, group_size=64), seed=1)[1]
    with pytest.raises(MoedslError, match="scales has shape"):
        writer.add_quantized("other", other)
    with pytest.raises(MoedslError, match="codes must lie"):
        writer.add_quantized("eight", quantized(QuantConfig(bits=8, group_size=32), seed=1)[1])
    with pytest.raises(MoedslError, match="symmetric config"):
        writer.add_quantized("asym", quantized(QuantConfig(bits=4, group_size=32, sym=False), seed=1)[1])
    per_channel = QuantConfig(bits=4, group_size=-1)
    with pytest.raises(MoedslError, match="multiple of 8"):
        CheckpointWriter(tmp_path / "c", "gptq", per_channel).add_quantized("narrow", rtn_quantize(torch.randn(OUT, 36), per_channel))
    with pytest.raises(MoedslError, match="multiple of group_size"):
        writer.add_quantized("ragged", rtn_quantize(torch.randn(OUT, 80), QuantConfig(bits=4, group_size=32)))
    with pytest.raises(MoedslError, match="bias shape"):
        writer.add_quantized("biased", result, bias=torch.zeros(3))
    with pytest.raises(MoedslError, match="flush them"):
        writer.finalize({})
    for bad in ("../x.safetensors", "x.bin", ".hidden.safetensors", "a/b.safetensors"):
        with pytest.raises(MoedslError, match="plain file name"):
            writer.flush_shard(bad)
    writer.flush_shard("a.safetensors")
    assert writer.flush_shard("empty.safetensors") is None  # nothing pending: no file
    with pytest.raises(MoedslError, match="already written"):
        writer.flush_shard("a.safetensors")
    with pytest.raises(MoedslError, match="collides"):
        writer.finalize({}, {"config.json": "{}"})
    writer.finalize({})
    with pytest.raises(MoedslError, match="already been finalized"):
        writer.add_tensor("late", torch.zeros(1))
    with pytest.raises(MoedslError, match="no shard"):
        CheckpointWriter(tmp_path / "empty", "gptq", cfg).finalize({})


def test_plain_tensors_are_copied_when_added(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    writer = CheckpointWriter(tmp_path, "gptq", cfg)
    t = torch.ones(4)
    writer.add_tensor("t", t)
    t.zero_()  # later changes do not leak into the checkpoint
    writer.flush_shard("s.safetensors")
    writer.finalize({})
    assert torch.equal(read_checkpoint(tmp_path)["t"], torch.ones(4))


# ---- packing ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), runs=st.integers(1, 3), cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pack_matches_reference_gptq_layout(bits, runs, cols, seed):
    n = 32 * runs
    values = torch.randint(0, 2**bits, (n, cols), generator=torch.Generator().manual_seed(seed))
    packed = pack(values, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (n * bits // 32, cols)
    np.testing.assert_array_equal(unpack_gptq_axis0(packed, bits, n), values.numpy())
    assert torch.equal(unpack(packed, bits, n, dim=0), values)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_matches_reference_ct_layout_with_padding(bits, n, seed):
    values = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(seed))
    packed = pack(values, bits, dim=1)
    assert packed.shape == (3, math.ceil(n * bits / 32))
    np.testing.assert_array_equal(unpack_ct(packed, bits, n), values.numpy())
