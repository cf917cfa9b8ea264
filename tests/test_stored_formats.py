"""Source checkpoints stored as FP8 (DeepSeek-V3 block-scaled layout) and MXFP4 (gpt-oss layout).

The published layouts, as the tests read them (independently of moedsl's decoder):
- FP8: `X.weight` float8_e4m3fn [out, in] + `X.weight_scale_inv` float32 [ceil(out/bm), ceil(in/bn)],
  W[i, j] = weight[i, j] * scale_inv[i // bm, j // bn].
- MXFP4: `P_blocks` uint8 [E, rows, cols/32, 16], `P_scales` uint8 [E, rows, cols/32]; byte k of a
  group holds elements 2k (low nibble) and 2k+1 (high nibble); an e2m1 code is sign(1) exp(2) man(1),
  value (-1)^s * (e == 0 ? m/2 : 2^(e-1) * (1 + m/2)); the scale is 2^(byte - 127); the bf16
  tensor is the transpose [E, cols, rows].

Checkpoints are built here from tiny bf16 models (`save_fp8` / `save_mxfp4`), and a bf16 twin
holding exactly the dequantized values (computed by the reference below) is built beside each:
quantizing the FP8/MXFP4 source must give byte-identical shards to quantizing the twin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moedsl
from moedsl.cli import main
from moedsl.errors import MoedslError
from moedsl.execute.dequant import fp8_block_dequantize, mxfp4_dequantize
from moedsl.execute.loader import LayerwiseLoader
from moedsl.models.stored_formats import fp8_block_quantize, mxfp4_quantize, save_fp8, save_mxfp4

BLOCK = (16, 16)  # small blocks, so tiny matrices have many blocks and partial ones (kv_a_proj: 40 rows)
RUN = dict(group_size=16, samples=4, seq_len=32, progress=False, device="cpu")


# ---- the published layouts, decoded the plain way ----------------------------------------------

def ref_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    rows, cols = weight.shape
    i = torch.arange(rows)[:, None] // bm
    j = torch.arange(cols)[None, :] // bn
    return weight.float() * scale_inv.float()[i, j]


def e2m1(code: torch.Tensor) -> torch.Tensor:
    s, e, m = (code >> 3) & 1, (code >> 1) & 3, code & 1
    mag = torch.where(e == 0, m.float() / 2, torch.exp2(e.float() - 1) * (1 + m.float() / 2))
    return torch.where(s == 1, -mag, mag)


def ref_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, G, 16], [..., rows, G] → [..., rows, G*32] (the Linear orientation)."""
    *lead, rows, groups, _ = blocks.shape
    out = torch.empty(*lead, rows, groups, 32)
    out[..., 0::2] = e2m1(blocks & 0x0F)
    out[..., 1::2] = e2m1(blocks >> 4)
    out = out * torch.exp2(scales.float() - 127)[..., None]
    return out.reshape(*lead, rows, groups * 32)


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def bf16_twin(src: Path, dst: Path) -> Path:
    """A plain bf16 checkpoint holding exactly what the FP8/MXFP4 checkpoint `src` decodes to."""
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    t = stored(src)
    plain = {}
    for k, v in t.items():
        if k.endswith("_scale_inv") or k.endswith("_scales"):
            continue
        if k.endswith("_blocks"):
            name = k.removesuffix("_blocks")
            plain[name] = ref_mxfp4(v, t[name + "_scales"]).transpose(-1, -2).to(torch.bfloat16).contiguous()
        elif k + "_scale_inv" in t:
            plain[k] = ref_fp8(v, t[k + "_scale_inv"], *qc["weight_block_size"]).to(torch.bfloat16)
        else:
            plain[k] = v
    dst.mkdir()
    save_file(plain, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fp8")
    src = tiny_model("deepseek_v3")
    fp8 = save_fp8(src, root / "fp8", block=BLOCK, max_shard_bytes=40_000)  # several shards
    return src, fp8, bf16_twin(fp8, root / "twin")


@pytest.fixture(scope="module")
def mxfp4_dirs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("mxfp4")
    src = tiny_model("gpt_oss")
    mx = save_mxfp4(src, root / "mxfp4")
    return src, mx, bf16_twin(mx, root / "twin")


# ---- the decoders against the published layouts ----------------------------------------------------

def test_mxfp4_known_bytes():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F  # element 0: code F = -6.0, element 1: code 2 = +1.0
    blocks[0, 0, 1] = 0x97  # element 2: code 7 = +6.0, element 3: code 9 = -0.5
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^(128 - 127) = 2
    got = mxfp4_dequantize(blocks, scales, torch.float32)
    assert got.shape == (1, 32)
    assert got[0, :4].tolist() == [-12.0, 2.0, 12.0, -1.0]
    assert got[0, 4:].abs().sum() == 0
    assert torch.equal(got, ref_mxfp4(blocks, scales))


def test_fp8_known_blocks():
    # 3x5 weight in 2x2 blocks: a 2x3 scale grid, the last block row and column partial
    w = torch.tensor([[1.0, 2.0, 0.5, -1.0, 4.0]] * 3).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    got = fp8_block_dequantize(w, s, (2, 2), torch.float32)
    assert got[0].tolist() == [1.0, 2.0, 1.0, -2.0, 16.0]
    assert got[2].tolist() == [8.0, 16.0, 8.0, -16.0, 128.0]
    with pytest.raises(MoedslError, match=r"needs \(2, 3\)"):
        fp8_block_dequantize(w, s[:, :2], (2, 2))


def test_encoders_against_bf16_originals():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 260, generator=g) * 0.02).to(torch.bfloat16)  # not a multiple of 128
    q, s = fp8_block_quantize(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    back = ref_fp8(q, s, 128, 128)
    assert torch.equal(fp8_block_dequantize(q, s, (128, 128), torch.float32), back)
    rel = (back - w.float()).abs() / w.float().abs().clamp_min(1e-3)
    assert rel.median() < 0.04 and (back - w.float()).abs().max() < 0.02 * 2**-3 * 5  # e4m3: 3 mantissa bits

    w = (torch.randn(4, 48, 96, generator=g) * 0.02).to(torch.bfloat16)
    b, sc = mxfp4_quantize(w)
    assert b.shape == (4, 48, 3, 16) and sc.shape == (4, 48, 3) and b.dtype == sc.dtype == torch.uint8
    back = ref_mxfp4(b, sc)
    assert torch.equal(mxfp4_dequantize(b, sc, torch.float32), back)
    step = torch.exp2(sc.float() - 127).repeat_interleave(32, dim=-1)  # the group's unit
    assert ((back - w.float()).abs() <= 2 * step).all()  # e2m1 spacing is at most 2 units
    assert torch.corrcoef(torch.stack([back.flatten(), w.float().flatten()]))[0, 1] > 0.97


def test_decoders_agree_with_transformers():
    """transformers' own FP8 and MXFP4 dequantization (its integrations) read the same bytes the same way."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 64, 96, generator=g) * 0.05
    b, sc = mxfp4_quantize(w)
    theirs = mx.convert_moe_packed_tensors(b, sc, dtype=torch.float32)  # returns the [E, cols, rows] tensor
    assert torch.equal(theirs, mxfp4_dequantize(b, sc, torch.float32).transpose(1, 2))

    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "Fp8Dequantize"):
        pytest.skip("this transformers has no Fp8Dequantize")
    w = torch.randn(256, 384, generator=g) * 0.05
    q, s = fp8_block_quantize(w, (128, 128))
    theirs = fp8.Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    assert torch.equal(theirs, fp8_block_dequantize(q, s, (128, 128), torch.float32))


# ---- the loader --------------------------------------------------------------------------------------

def _layers(model_dir: Path, strict: bool = False):
    loader = LayerwiseLoader(model_dir, strict=strict)
    model = loader.skeleton()
    loader.load_non_layer(model)
    for i in range(loader.num_layers):
        loader.load_layer(model, i)
    return loader, model


def test_fp8_source_loads_as_its_bf16_values(fp8_dirs):
    src, fp8, twin = fp8_dirs
    files = stored(fp8)
    assert sum(k.endswith("weight_scale_inv") for k in files) > 20
    assert any(v.dtype == torch.float8_e4m3fn for v in files.values())
    assert len(list(fp8.glob("*.safetensors"))) > 2
    loader, model = _layers(fp8, strict=True)
    assert loader.stored_format.method == "fp8" and loader.stored_format.block == BLOCK
    assert not loader.unexpected_keys and not loader.warnings  # every scale consumed, nothing missing
    assert not any(k.endswith("_scale_inv") for k in loader.checkpoint_keys())
    assert not hasattr(model.config, "quantization_config")  # plain Linears, not transformers' FP8 modules
    assert {type(m).__name__ for m in model.modules()}.isdisjoint({"FP8Linear", "FP8Expert"})
    _, plain = _layers(twin)
    _, original = _layers(src)
    for (name, p), (_, q), (_, o) in zip(model.state_dict().items(), plain.state_dict().items(),
                                         original.state_dict().items()):
        assert torch.equal(p, q), name  # exactly the published decoding
        if "layers." in name and name.endswith(("proj.weight", "gate_up_proj", "down_proj")):
            # and close to the weights it was made from (e4m3: relative steps of 1/8 at worst)
            assert (p.float() - o.float()).abs().max() <= o.float().abs().max() / 8 + 1e-6, name


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_stored_layers_read_ahead_load_without_their_shards(which, fp8_dirs, mxfp4_dirs, tmp_path):
    """A layer read ahead (`read_layer`, as the background reader does) carries the stored FP8/MXFP4
    bytes of its quantized tensors, so `load_layer` dequantizes them without reading a shard on the
    main thread: with the shards gone, the layers load to the same values as straight from the shards."""
    from moedsl.execute.loader import StoredParts

    _, source, _ = fp8_dirs if which == "fp8" else mxfp4_dirs
    copy = tmp_path / which
    shutil.copytree(source, copy)
    loader = LayerwiseLoader(copy, strict=True)
    model = loader.skeleton()
    loader.load_non_layer(model)
    ahead = [loader.read_layer(i) for i in range(loader.num_layers)]
    parts = [t for layer in ahead for t in layer.values() if isinstance(t, StoredParts)]
    assert parts and all(len(t.tensors) == 2 for t in parts)
    _, direct = _layers(source)
    for shard in copy.glob("*.safetensors"):
        shard.unlink()
    for i, tensors in enumerate(ahead):
        loader.load_layer(model, i, tensors=tensors)
    layers = {k: v for k, v in model.state_dict().items() if ".layers." in k}
    want = direct.state_dict()
    assert layers and all(torch.equal(v, want[k]) for k, v in layers.items())


def test_mxfp4_source_loads_as_its_bf16_values(mxfp4_dirs):
    src, mx, twin = mxfp4_dirs
    files = stored(mx)
    blocks = [k for k in files if k.endswith("_blocks")]
    assert blocks and all(files[k].dim() == 4 and files[k].shape[-1] == 16 for k in blocks)
    loader, model = _layers(mx, strict=True)
    assert not loader.unexpected_keys and not loader.warnings
    assert "model.layers.0.mlp.experts.gate_up_proj" in loader.checkpoint_keys()
    _, plain = _layers(twin)
    _, original = _layers(src)
    for (name, p), (_, q), (_, o) in zip(model.state_dict().items(), plain.state_dict().items(),
                                         original.state_dict().items()):
        assert torch.equal(p, q), name
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            err = (p.float() - o.float()).abs()
            assert err.max() <= o.float().abs().max() / 2, name  # e2m1 steps are at most 2 of a group's 6
            assert torch.corrcoef(torch.stack([p.float().flatten(), o.float().flatten()]))[0, 1] > 0.97, name


# ---- quantizing from them ----------------------------------------------------------------------------

def _same_output(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir() if p.name != "moedsl-report.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "moedsl-report.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_quantizing_from_stored_equals_quantizing_from_bf16(which, fp8_dirs, mxfp4_dirs, tmp_path):
    _, source, twin = fp8_dirs if which == "fp8" else mxfp4_dirs
    report = moedsl.quantize(model=source, out=tmp_path / "from-stored", **RUN)
    moedsl.quantize(model=twin, out=tmp_path / "from-bf16", **RUN)
    _same_output(tmp_path / "from-stored", tmp_path / "from-bf16")  # shards, index and config, byte for byte
    config = json.loads((tmp_path / "from-stored" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and "weight_block_size" not in qc and "modules_to_not_convert" not in qc
    assert config["dtype"] == "bfloat16"
    assert report.layers


def test_validate_reads_stored_checkpoint_names(fp8_dirs, mxfp4_dirs, capsys):
    assert main(["validate", "deepseek_v3", "--model", str(fp8_dirs[1])]) == 0
    assert main(["validate", "gpt_oss", "--model", str(mxfp4_dirs[1])]) == 0
    out = capsys.readouterr().out
    assert "✓ checkpoint names" in out and "✗" not in out


# ---- what is refused, and how -----------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes):
    config = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (d / "config.json").write_text(json.dumps(config))


def test_bad_stored_checkpoints_are_refused(fp8_dirs, tmp_path):
    fp8 = fp8_dirs[1]
    d = _copy(fp8, tmp_path / "awq")
    _edit_config(d, quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(MoedslError, match="quant_method `awq`"):
        LayerwiseLoader(d)

    d = _copy(fp8, tmp_path / "per-tensor")
    _edit_config(d, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(MoedslError, match="weight_block_size"):
        LayerwiseLoader(d)

    d = _copy(fp8, tmp_path / "no-config")  # FP8 tensors, but the config does not say so
    _edit_config(d, quantization_config=None)
    with pytest.raises(MoedslError, match=r"holds FP8 scales \(e.g. `.*weight_scale_inv`\) but its config.json"):
        LayerwiseLoader(d)

    d = _copy(fp8, tmp_path / "unscaled")  # an FP8 weight whose scale is gone
    index = json.loads((d / "model.safetensors.index.json").read_text())
    drop = {k for k in index["weight_map"] if k.endswith("weight_scale_inv")}
    for shard in {index["weight_map"][k] for k in drop}:
        with safe_open(str(d / shard), "pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        save_file(kept, str(d / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    loader = LayerwiseLoader(d)
    model = loader.skeleton()
    with pytest.raises(MoedslError, match=r"is stored as F8_E4M3 with no `.*weight_scale_inv` beside it"):
        for i in range(loader.num_layers):
            loader.load_layer(model, i)

    d = _copy(fp8, tmp_path / "orphan")  # a scale whose weight is gone
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = next(k for k in index["weight_map"] if k.endswith("q_a_proj.weight"))
    shard = d / index["weight_map"].pop(victim)
    with safe_open(str(shard), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != victim}
    save_file(kept, str(shard), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoedslError, match=rf"`{victim}_scale_inv` scales a weight `{victim}` that is not"):
        LayerwiseLoader(d)
    assert main(["quantize", "--model", str(d), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert not (tmp_path / "o").exists()
