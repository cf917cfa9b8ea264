"""Write a model the way the checkpoints users download store it: FP8 block-scaled, or MXFP4.

No hub access here, so tests and benchmarks make such checkpoints themselves, in the published
layouts that `moedsl/execute/dequant.py` reads:

- `save_fp8`: the DeepSeek-V3 layout. Every 2-D (or stacked) Linear weight inside the decoder
  layers, except the routers, becomes float8_e4m3fn with a float32 `weight_scale_inv` per
  (bm x bn) block: scale = amax(block) / 448, weight = round(W / scale). Everything else is bf16.
  config.json gets `quantization_config {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
  weight_block_size: [bm, bn]}`.
- `save_mxfp4`: the gpt-oss layout. The fused expert tensors (`experts.gate_up_proj`,
  `experts.down_proj`, stored [E, in, out]) become `_blocks` [E, out, in/32, 16] (two e2m1 codes
  per byte, low nibble first) and `_scales` [E, out, in/32] (e8m0, 2^(byte - 127)); the shared
  exponent of a group is floor(log2(amax)) - 2, so its largest value lands in e2m1's top binade
  (OCP MX). config.json gets `quantization_config {quant_method: mxfp4, modules_to_not_convert}`.

`write_stored` takes any stream of (name, tensor) so a benchmark can write a full-size layer
without first writing it in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moedsl.errors import MoedslError
from moedsl.execute.dequant import E2M1_VALUES, E8M0_BIAS, FP8_SCALE, MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES
from moedsl.execute.fingerprint import SIDE_FILES

__all__ = ["fp8_block_quantize", "mxfp4_quantize", "save_fp8", "save_mxfp4", "write_stored", "fp8_config",
           "MXFP4_CONFIG"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MXFP4_CONFIG = {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}


def fp8_config(block: tuple[int, int] = (128, 128)) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


@torch.no_grad()
def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., rows, cols] → (float8_e4m3fn weight, float32 weight_scale_inv [..., ceil(rows/bm), ceil(cols/bn)])."""
    bm, bn = block
    *lead, rows, cols = w.shape
    gr, gc = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros((*lead, gr * bm, gc * bn), dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.float()
    blocks = padded.reshape(*lead, gr, bm, gc, bn)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., gr, gc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, gr * bm, gc * bn)[..., :rows, :cols].contiguous()
    return q, scale.contiguous()


@torch.no_grad()
def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., rows, cols] (cols a multiple of 32) → (blocks uint8 [..., rows, cols/32, 16], scales uint8
    [..., rows, cols/32]), each value rounded to the nearest e2m1 of its group's power-of-two scale."""
    *lead, rows, cols = w.shape
    if cols % MXFP4_GROUP:
        raise MoedslError(f"MXFP4 needs the input dimension to be a multiple of {MXFP4_GROUP}, got {cols}")
    g = w.float().reshape(*lead, rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    amax = g.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - 2, torch.zeros_like(amax))
    exp = exp.clamp(-E8M0_BIAS, E8M0_BIAS)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=w.device)
    scaled = g / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # nearest e2m1 (ties: lower code)
    pairs = codes.reshape(*lead, rows, cols // MXFP4_GROUP, MXFP4_GROUP // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)  # low nibble: the even element
    return blocks.contiguous(), (exp + E8M0_BIAS).to(torch.uint8).contiguous()


def _fp8_target(name: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's choice: Linear weights inside the decoder layers, not the routers."""
    return (".layers." in name and name.endswith(".weight") and t.dim() >= 2 and t.is_floating_point()
            and not name.endswith((".gate.weight", ".router.weight")))


def _mxfp4_target(name: str, t: torch.Tensor) -> bool:
    """gpt-oss's choice: the fused expert weights (not their biases)."""
    return ".experts." in name and name.endswith(("gate_up_proj", "down_proj")) and t.dim() == 3


def write_stored(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, config: dict, method: str,
                 block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                 target: Callable[[str, torch.Tensor], bool] | None = None,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Write `tensors` (checkpoint names, bf16-checkpoint layout) as an FP8 (`method="fp8"`) or MXFP4
    (`"mxfp4"`) checkpoint with its config.json and index. Non-targets are stored as `dtype`."""
    if method not in ("fp8", "mxfp4"):
        raise MoedslError(f"unknown stored format `{method}`", expected=["fp8", "mxfp4"])
    target = target or (_fp8_target if method == "fp8" else _mxfp4_target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[str] = []
    total = shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        shard_bytes = 0
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shard})
            shard = {}

    def add(name: str, t: torch.Tensor):
        nonlocal total, shard_bytes
        t = t.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = t
        total += size
        shard_bytes += size

    for name, t in tensors:
        if not target(name, t):
            add(name, t.to(dtype) if t.is_floating_point() else t)
        elif method == "fp8":
            q, s = fp8_block_quantize(t, block)
            add(name, q)
            add(name + FP8_SCALE, s)
        else:
            b, s = mxfp4_quantize(t.transpose(-1, -2))  # stored as [E, out, in]
            add(name + MXFP4_BLOCKS, b)
            add(name + MXFP4_SCALES, s)
    flush()
    # rename into the usual model-0000i-of-0000n names
    final: dict[str, str] = {}
    for i, name in enumerate(names, 1):
        new = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        (out / name).rename(out / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {**config, "dtype": str(dtype).removeprefix("torch."),
              "quantization_config": fp8_config(block) if method == "fp8" else dict(MXFP4_CONFIG)}
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _read_dir(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from moedsl.execute.loader import shard_map

    by_shard: dict[Path, list[str]] = {}
    for key, shard in shard_map(src).items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        with safe_open(str(shard), framework="pt") as f:
            for key in sorted(keys):
                yield key, f.get_tensor(key)


def _save(src_dir, out_dir, method: str, **kw) -> Path:
    src = Path(src_dir)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise MoedslError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    out = write_stored(_read_dir(src), out_dir, config, method, **kw)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def save_fp8(src_dir: str | Path, out_dir: str | Path, block: tuple[int, int] = (128, 128), **kw) -> Path:
    """The saved model in `src_dir` as a DeepSeek-V3-layout FP8 checkpoint in `out_dir`."""
    return _save(src_dir, out_dir, "fp8", block=block, **kw)


def save_mxfp4(src_dir: str | Path, out_dir: str | Path, **kw) -> Path:
    """The saved model in `src_dir` (gpt_oss) as a gpt-oss-layout MXFP4 checkpoint in `out_dir`."""
    return _save(src_dir, out_dir, "mxfp4", **kw)
