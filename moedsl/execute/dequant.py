"""Checkpoints whose weights are stored smaller than the model computes: FP8 block-scaled, MXFP4.

What users download is often not bf16. Two published layouts are read:

- FP8 block-scaled (DeepSeek-V3/R1 and the releases that copy its layout):
  `config.json` has `quantization_config: {quant_method: "fp8", weight_block_size: [bm, bn]}`;
  a Linear weight `X.weight` [out, in] is stored as float8_e4m3fn beside `X.weight_scale_inv`
  float32 [ceil(out/bm), ceil(in/bn)], and W[i, j] = weight[i, j] * weight_scale_inv[i // bm, j // bn]
  (the last block row and column may be partial).
- MXFP4 (gpt-oss, `quant_method: "mxfp4"`): a fused expert tensor `P` is stored as `P_blocks`
  uint8 [..., rows, cols/32, 16] and `P_scales` uint8 [..., rows, cols/32]. Each byte holds two
  e2m1 values, the low nibble first; the 32 values of a group share the scale 2^(byte - 127)
  (e8m0). The matrix [..., rows, cols] is the Linear orientation [out, in]; the bf16 checkpoint
  stores its transpose [..., cols, rows] (gpt-oss keeps experts as [E, in, out]).

The loader reads checkpoints by *logical* name, the name a bf16 checkpoint would have: `group`
maps each logical name to the stored tensors it is made of (the scales are consumed there, never
"unused"), and `read` brings them to the device and dequantizes in fp32, then casts to the
checkpoint's dtype, so transformers' conversion sees exactly what a bf16 checkpoint would give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from moedsl.errors import MoedslError

__all__ = ["StoredFormat", "group", "read", "fp8_block_dequantize", "mxfp4_dequantize", "E2M1_VALUES"]

FP8_SCALE = "_scale_inv"  # `X.weight` + `X.weight_scale_inv`
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
MXFP4_GROUP = 32
E8M0_BIAS = 127
# e2m1 by its 4-bit code: sign bit 3, then 2 exponent bits and 1 mantissa bit (OCP MX spec)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names
SUPPORTED = ("fp8 (block-scaled, weight_block_size)", "mxfp4 (gpt-oss _blocks/_scales)")


@dataclass(frozen=True)
class StoredFormat:
    """How a checkpoint stores its weights: plain (method None), "fp8" or "mxfp4"."""

    method: str | None = None
    block: tuple[int, int] | None = None  # fp8: weight_block_size (rows, cols)
    dtype: torch.dtype = torch.bfloat16  # what dequantized weights become: the checkpoint's dtype

    @classmethod
    def of_config(cls, config: dict, where: str) -> "StoredFormat":
        """The format `config` (a config.json as a dict) declares; `where` names the file in errors."""
        dtype = _config_dtype(config)
        qc = config.get("quantization_config")
        if qc is None:
            return cls(dtype=dtype)
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method == "fp8":
            block = qc.get("weight_block_size")
            if not (isinstance(block, (list, tuple)) and len(block) == 2
                    and all(isinstance(b, int) and b > 0 for b in block)):
                raise MoedslError(
                    f"{where}: quantization_config is fp8 but `weight_block_size` is {block!r}; moedsl reads "
                    "block-scaled FP8 (DeepSeek-V3 layout: `weight_block_size: [128, 128]`, `weight_scale_inv`)",
                    notes=["per-tensor or per-channel FP8 (compressed-tensors `weight_scale`) is not read"])
            if qc.get("fmt", "e4m3") != "e4m3":
                raise MoedslError(f"{where}: FP8 format `{qc.get('fmt')}`: moedsl reads e4m3 weights")
            return cls("fp8", (block[0], block[1]), dtype)
        if method == "mxfp4":
            return cls("mxfp4", None, dtype)
        raise MoedslError(
            f"{where}: the checkpoint is stored as quant_method `{method}`, which moedsl cannot read as a source",
            expected=list(SUPPORTED),
            notes=["moedsl quantizes from bf16/fp16/fp32 weights, or from the FP8 and MXFP4 layouts above"])

    def describe(self) -> str:
        if self.method == "fp8":
            return f"FP8 e4m3, {self.block[0]}x{self.block[1]} blocks (weight_scale_inv)"
        if self.method == "mxfp4":
            return "MXFP4 (e2m1 blocks, e8m0 scales per 32)"
        return "plain"


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.bfloat16
    return dtype


def group(stored: Iterable[str], fmt: StoredFormat, where: str) -> dict[str, tuple[str, ...]]:
    """Logical checkpoint name → the stored names it is read from (itself, for a plain tensor).

    A scale without its weight, or blocks without scales, is an error: nothing is dropped silently."""
    stored = set(stored)
    parts: dict[str, tuple[str, ...]] = {}
    consumed: set[str] = set()
    if fmt.method == "fp8":
        for key in stored:
            if key.endswith(FP8_SCALE):
                weight = key[: -len(FP8_SCALE)]
                if weight not in stored:
                    raise MoedslError(f"{where}: `{key}` scales a weight `{weight}` that is not in the checkpoint")
                parts[weight] = (weight, key)
                consumed |= {weight, key}
    elif fmt.method == "mxfp4":
        for key in stored:
            if key.endswith(MXFP4_BLOCKS):
                name = key[: -len(MXFP4_BLOCKS)]
                scales = name + MXFP4_SCALES
                if scales not in stored:
                    raise MoedslError(f"{where}: `{key}` has no `{scales}` beside it (MXFP4 needs both)")
                if name in stored:
                    raise MoedslError(f"{where}: `{name}` is stored both plain and as MXFP4 `{key}`")
                parts[name] = (key, scales)
                consumed |= {key, scales}
        for key in stored - consumed:
            if key.endswith(MXFP4_SCALES) and key[: -len(MXFP4_SCALES)] + MXFP4_BLOCKS not in stored:
                raise MoedslError(f"{where}: `{key}` has no `{key[: -len(MXFP4_SCALES)]}{MXFP4_BLOCKS}` beside it")
    else:
        hint = next((k for k in sorted(stored) if k.endswith((FP8_SCALE, MXFP4_BLOCKS))), None)
        if hint is not None:
            kind = "FP8 scales" if hint.endswith(FP8_SCALE) else "MXFP4 blocks"
            raise MoedslError(f"{where}: the checkpoint holds {kind} (e.g. `{hint}`) but its config.json has no "
                              "`quantization_config` saying how they are stored",
                              notes=['FP8: {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}; '
                                     'MXFP4: {"quant_method": "mxfp4"}'])
    for key in stored - consumed:
        parts[key] = (key,)
    return parts


def read(logical: str, parts: tuple[str, ...], get: Callable[[str], object], fmt: StoredFormat,
         device: torch.device | str, where: str):
    """The tensor a bf16 checkpoint would hold under `logical`: a safetensors slice (read lazily by
    the caller) for a plain tensor, or a dequantized tensor on `device`. `get(name)` gives the
    stored slice of a stored name (or the stored tensor itself, read ahead)."""
    if len(parts) == 1:
        sl = get(parts[0])
        if sl.get_dtype() in FP8_DTYPES:
            raise MoedslError(
                f"{where}: `{logical}` is stored as {sl.get_dtype()} with no `{logical}{FP8_SCALE}` beside it",
                notes=["moedsl reads block-scaled FP8 (config quantization_config.quant_method \"fp8\" with "
                       "weight_block_size, and a weight_scale_inv per weight)"])
        return sl
    # from pinned host memory (parts read ahead) the copies are asynchronous, ordered before the dequantization
    a, b = (get(p)[...].to(device, non_blocking=True) for p in parts)
    try:
        if fmt.method == "fp8":
            return fp8_block_dequantize(a, b, fmt.block, fmt.dtype)
        return mxfp4_dequantize(a, b, fmt.dtype).transpose(-1, -2).contiguous()
    except MoedslError as err:
        raise MoedslError(f"{where}: `{logical}`: {err.message}") from None


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = weight * scale_inv, one scale per (bm x bn) block, computed in fp32, returned as `dtype`."""
    if weight.dtype != torch.float8_e4m3fn:
        raise MoedslError(f"weight is {weight.dtype}, expected float8_e4m3fn beside a weight_scale_inv")
    bm, bn = block
    *lead, rows, cols = weight.shape
    want = (*lead, -(-rows // bm), -(-cols // bn))
    if tuple(scale_inv.shape) != want:
        raise MoedslError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(weight.shape)} weight "
                          f"in {bm}x{bn} blocks needs {want}")
    if lead:  # stacked experts: one at a time, so the fp32 temporaries stay one matrix big
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for e in range(weight.shape[0]):
            out[e] = fp8_block_dequantize(weight[e], scale_inv[e], block, dtype)
        return out
    s = scale_inv.to(torch.float32)
    s = s.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return (weight.to(torch.float32) * s).to(dtype)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., rows, G, 16] e2m1 pairs and [..., rows, G] e8m0 scales → [..., rows, G*32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MoedslError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] * 2 != MXFP4_GROUP or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise MoedslError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                          f"(blocks [..., rows, groups, {MXFP4_GROUP // 2}], scales [..., rows, groups])")
    if blocks.dim() > 3:  # stacked experts: one at a time, so the fp32 temporaries stay one matrix big
        out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * MXFP4_GROUP), dtype=dtype, device=blocks.device)
        for e in range(blocks.shape[0]):
            out[e] = mxfp4_dequantize(blocks[e], scales[e], dtype)
        return out
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # low nibble first
    values = values.flatten(-2)  # [..., rows, G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)
