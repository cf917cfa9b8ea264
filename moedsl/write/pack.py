"""Bit packing of unsigned integer codes into int32 words.

Both formats we write pack codes the same way: each run of 32 consecutive values along the
packed axis becomes `bits` int32 words holding one little-endian bit stream, value k of the
run at bit k·bits. A value may straddle two words (3-bit: values 10 and 21 of each run),
which is exactly the 3-bit GPTQ layout of AutoGPTQ; for 2, 4 and 8 bits it is the familiar
"value j at shift bits·j" layout. A final partial run is zero-padded and only the words
that hold real bits are kept: ceil(n·bits / 32) words for n values.

Also here: the checks every writer runs on a QuantResult before packing it.
"""

from __future__ import annotations

import math

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.quantizer import QuantConfig


def packed_length(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, each in [0, 2**bits)) along `dim` (0 or 1) of a 2-D tensor."""
    if values.dim() != 2 or dim not in (0, 1):
        raise ValueError("pack expects a 2-D tensor and dim 0 or 1")
    v = values.to(torch.int64)
    if dim == 1:
        return pack(v.T, bits, 0).T.contiguous()
    n, m = v.shape
    runs = math.ceil(n / 32)
    if runs * 32 != n:
        v = torch.cat([v, v.new_zeros(runs * 32 - n, m)])
    v = v.view(runs, 32, m)
    words = v.new_zeros(runs, bits, m)
    for k in range(32):
        bit = k * bits
        word, shift = divmod(bit, 32)
        words[:, word] += v[:, k] << shift
        if shift + bits > 32:  # the value's high bits continue in the next word
            words[:, word + 1] += v[:, k] >> (32 - shift)
    words = words.view(runs * bits, m)[: packed_length(n, bits)] & 0xFFFFFFFF
    return to_int32(words)


def to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2**32) (int64) as int32 bit patterns."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of `pack`: int64 codes with `n` entries along `dim`."""
    if dim == 1:
        return unpack(packed.T, bits, n, 0).T.contiguous()
    p = packed.to(torch.int64) & 0xFFFFFFFF
    runs = math.ceil(n / 32)
    if p.shape[0] < runs * bits:
        p = torch.cat([p, p.new_zeros(runs * bits - p.shape[0], p.shape[1])])
    p = p.view(runs, bits, -1)
    mask = (1 << bits) - 1
    out = p.new_zeros(runs, 32, p.shape[2])
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        value = p[:, word] >> shift
        if shift + bits > 32:
            value = value | (p[:, word + 1] << (32 - shift))
        out[:, k] = value & mask
    return out.view(runs * 32, -1)[:n]


def check_result(name: str, result, cfg) -> tuple[int, int]:
    """Shapes and value ranges of a QuantResult against its config; returns (out, in).

    Every writer calls this before packing: a wrong shape or an out-of-range code would
    otherwise be packed silently into a checkpoint that loads but computes garbage.
    """
    def bad(msg: str) -> MoedslError:
        return MoedslError(f"cannot write `{name}`: {msg}", code="write")

    if result.codes.dim() != 2 or (result.weight.numel() and tuple(result.weight.shape) != tuple(result.codes.shape)):
        raise bad(f"codes {tuple(result.codes.shape)} and weight {tuple(result.weight.shape)} must be the same 2-D shape")
    out_features, in_features = result.codes.shape
    groups = cfg.n_groups(in_features)
    for what, t in (("scales", result.scales), ("zeros", result.zeros)):
        if tuple(t.shape) != (out_features, groups):
            raise bad(f"{what} has shape {tuple(t.shape)}, expected {(out_features, groups)} for group_size {cfg.group_size}")
    if tuple(result.g_idx.shape) != (in_features,):
        raise bad(f"g_idx has shape {tuple(result.g_idx.shape)}, expected ({in_features},)")
    if in_features and (int(result.g_idx.min()) < 0 or int(result.g_idx.max()) >= groups):
        raise bad(f"g_idx values must lie in [0, {groups})")
    if result.codes.numel() and (int(result.codes.min()) < 0 or int(result.codes.max()) > cfg.maxq):
        raise bad(f"codes must lie in [0, {cfg.maxq}] for {cfg.bits} bits")
    if int(result.zeros.min()) < 0 or int(result.zeros.max()) > cfg.maxq:
        raise bad(f"zero-points must lie in [0, {cfg.maxq}] for {cfg.bits} bits")
    if cfg.sym and bool((result.zeros != (cfg.maxq + 1) // 2).any()):
        raise bad(f"a symmetric config needs every zero-point to be {(cfg.maxq + 1) // 2}; was it quantized with sym=False?")
    if not bool(torch.isfinite(result.scales).all()) or bool((result.scales <= 0).any()):
        raise bad("scales must be finite and positive")
    return out_features, in_features


def check_scales_fit(name: str, scales: torch.Tensor, dtype: torch.dtype, cfg) -> None:
    """The stored scales must be the quantizer's scales exactly, or the checkpoint would not
    dequantize to the weights GPTQ produced (and compensated for)."""
    if not torch.equal(scales.to(dtype).to(torch.float32), scales.to(torch.float32)):
        stored = str(dtype).removeprefix("torch.")
        raise MoedslError(
            f"cannot write `{name}`: its scales are not exactly representable in {stored}, the dtype this "
            f"checkpoint stores them in (the config rounds scales to {cfg.scale_dtype}); "
            f"quantize with QuantConfig(scale_dtype='{stored}')",
            code="write",
        )


def shape_problems(out_features: int, in_features: int, cfg: QuantConfig, fmt: str) -> list[str]:
    """Why a matrix of this shape cannot be written with `cfg` in format `fmt` (empty: it can).

    Both formats need whole groups along the input; GPTQ also packs both dimensions into whole
    int32 words. The writers and the executor's pre-flight check ask the same question here."""
    return group_problems(in_features, cfg) + packing_problems(out_features, in_features, cfg, fmt)


def group_problems(in_features: int, cfg: QuantConfig) -> list[str]:
    """Problems another group size fixes: whole groups along the input."""
    if cfg.group_size != -1 and in_features % cfg.group_size:
        return [f"in_features {in_features} is not a multiple of group_size {cfg.group_size}"]
    return []


def packing_problems(out_features: int, in_features: int, cfg: QuantConfig, fmt: str) -> list[str]:
    """Problems no group size fixes: GPTQ packs both dimensions into whole int32 words."""
    problems = []
    if fmt == "gptq":
        need = 32 if cfg.bits == 3 else 32 // cfg.bits
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if (n * cfg.bits) % 32:
                problems.append(f"{what} {n} is not a multiple of {need} ({cfg.bits}-bit GPTQ packs whole int32 words)")
    return problems

