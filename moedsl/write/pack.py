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
from moedsl.gptq.quantizer import QuantConfig, QuantStack


def packed_length(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, each in [0, 2**bits)) along `dim` (0 or 1) of a 2-D tensor."""
    if values.dim() != 2 or dim not in (0, 1):
        raise ValueError("pack expects a 2-D tensor and dim 0 or 1")
    if dim == 0:
        return pack_last(values.T, bits).T.contiguous()
    return pack_last(values, bits)


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last axis of a tensor of any rank ([..., n] -> [..., ceil(n·bits/32)]
    int32), on the tensor's own device: every matrix of a stack in one pass."""
    *lead, n = values.shape
    runs = math.ceil(n / 32)
    if runs * 32 != n:
        values = torch.cat([values, values.new_zeros(*lead, runs * 32 - n)], dim=-1)
    if 32 % bits == 0:
        # whole values per word: value j of a word at bit bits·j (a run is `bits` words)
        per_word = 32 // bits
        v = values.reshape(*lead, runs * bits, per_word)
        words = v[..., 0].to(torch.int64, copy=True)
        for j in range(1, per_word):
            words |= v[..., j].to(torch.int64) << (bits * j)
    else:
        v = values.reshape(*lead, runs, 32)
        words = torch.zeros(*lead, runs, bits, dtype=torch.int64, device=values.device)
        for k in range(32):
            word, shift = divmod(k * bits, 32)
            vk = v[..., k].to(torch.int64)
            words[..., word] |= vk << shift
            if shift + bits > 32:  # the value's high bits continue in the next word
                words[..., word + 1] |= vk >> (32 - shift)
        words = words.reshape(*lead, runs * bits)
    return to_int32(words[..., : packed_length(n, bits)] & 0xFFFFFFFF).contiguous()


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
    """Shapes and value ranges of a QuantResult against its config; returns (out, in)."""
    if result.codes.dim() != 2 or (result.weight.numel() and tuple(result.weight.shape) != tuple(result.codes.shape)):
        raise MoedslError(f"cannot write `{name}`: codes {tuple(result.codes.shape)} and weight "
                          f"{tuple(result.weight.shape)} must be the same 2-D shape", code="write")
    return check_stack([name], _as_stack(result), cfg)


def single_stack(name: str, result, cfg, bias: torch.Tensor | None = None) -> QuantStack:
    """One checked QuantResult (and its bias [out]) as a stack of one on the CPU: what the
    one-matrix writers hand their stacked versions."""
    check_result(name, result, cfg)
    return QuantStack.of([result], None if bias is None else bias.detach()[None]).to("cpu")


def _as_stack(result) -> QuantStack:
    return QuantStack(codes=result.codes[None], scales=result.scales[None], zeros=result.zeros[None],
                      g_idx=result.g_idx[None])


def check_stack(names: list[str], stack, cfg, scales_stored_in: torch.dtype | None = None) -> tuple[int, int]:
    """Shapes and value ranges of a QuantStack (one name per matrix) against its config; returns (out, in).

    Every writer calls this before packing: a wrong shape or an out-of-range code would
    otherwise be packed silently into a checkpoint that loads but computes garbage. The checks
    cover the whole stack at once, with one device synchronization; a failure names the first
    matrix at fault. scales_stored_in: the dtype the checkpoint stores scales in (`scales_fit`)."""
    def bad(msg: str, per_matrix: torch.Tensor | None = None) -> MoedslError:
        at = int(per_matrix.int().argmax()) if per_matrix is not None and len(names) > 1 else 0
        return MoedslError(f"cannot write `{names[at]}`: {msg}", code="write")

    if stack.codes.dim() != 3 or stack.codes.shape[0] != len(names):
        raise bad(f"codes {tuple(stack.codes.shape[1:])} must be a 2-D shape per matrix")
    n, out_features, in_features = stack.codes.shape
    groups = cfg.n_groups(in_features)
    for what, t in (("scales", stack.scales), ("zeros", stack.zeros)):
        if tuple(t.shape) != (n, out_features, groups):
            raise bad(f"{what} has shape {tuple(t.shape[1:])}, expected {(out_features, groups)} for group_size "
                      f"{cfg.group_size}")
    if tuple(stack.g_idx.shape) != (n, in_features):
        raise bad(f"g_idx has shape {tuple(stack.g_idx.shape[1:])}, expected ({in_features},)")
    if stack.bias is not None and tuple(stack.bias.shape) != (n, out_features):
        raise bad(f"bias shape {tuple(stack.bias.shape[1:])} != ({out_features},)")

    def outside(t: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """Per matrix: does any value lie outside [low, high]?"""
        if not t.numel():
            return torch.zeros(n, dtype=torch.bool, device=t.device)
        flat = t.reshape(n, -1)
        return (flat.amin(dim=1) < low) | (flat.amax(dim=1) > high)

    half = (cfg.maxq + 1) // 2
    checks = [(outside(stack.g_idx, 0, groups - 1) if in_features else None, f"g_idx values must lie in [0, {groups})"),
              (outside(stack.codes, 0, cfg.maxq), f"codes must lie in [0, {cfg.maxq}] for {cfg.bits} bits"),
              (outside(stack.zeros, 0, cfg.maxq), f"zero-points must lie in [0, {cfg.maxq}] for {cfg.bits} bits"),
              (outside(stack.zeros, half, half) if cfg.sym else None,
               f"a symmetric config needs every zero-point to be {half}; was it quantized with sym=False?")]
    scales = stack.scales.reshape(n, -1)
    checks.append((~(torch.isfinite(scales) & (scales > 0)).all(dim=1), "scales must be finite and positive"))
    if scales_stored_in is not None:
        checks.append(scales_fit(scales, scales_stored_in, cfg))
    checks = [(w, msg) for w, msg in checks if w is not None]
    # one synchronization for all of them (the packer runs this on the GPU for every stack it packs)
    failed = torch.stack([w.any() for w, _ in checks]).tolist()
    for (w, msg), fail in zip(checks, failed):
        if fail:
            raise bad(msg, w)
    return out_features, in_features


def scales_fit(scales: torch.Tensor, dtype: torch.dtype, cfg) -> tuple[torch.Tensor, str]:
    """Per matrix: are its scales [n, ...] not exactly representable in `dtype`, the dtype the checkpoint stores
    them in? They must be the quantizer's scales exactly, or the checkpoint would not dequantize to the weights
    GPTQ produced (and compensated for). With the message `check_stack` raises for a matrix that fails."""
    scales = scales.reshape(scales.shape[0], -1)
    wrong = (scales.to(dtype).to(torch.float32) != scales.to(torch.float32)).any(dim=1)
    stored = str(dtype).removeprefix("torch.")
    return wrong, (f"its scales are not exactly representable in {stored}, the dtype this checkpoint stores them "
                   f"in (the config rounds scales to {cfg.scale_dtype}); quantize with "
                   f"QuantConfig(scale_dtype='{stored}')")


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

