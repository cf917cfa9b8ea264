"""An independent reader for the two checkpoint formats, used only by the tests.

Written from the format descriptions (AutoGPTQ's packing, vLLM's loaders, compressed-tensors'
pack-quantized), NOT from moedsl.write: it uses numpy, unpacks word by word with the
per-format tables spelled out, and never imports moedsl. If the writer and this file agree,
two separate readings of the formats agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def read_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor named in model.safetensors.index.json, loaded from its shard."""
    directory = Path(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded = load_file(str(directory / shard))
        for key, value in loaded.items():
            assert index["weight_map"][key] == shard, f"{key} is in {shard} but indexed elsewhere"
            tensors[key] = value
    assert set(tensors) == set(index["weight_map"]), "index and shards disagree"
    return tensors


def _u32(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.int32, t.dtype
    return t.numpy().view(np.uint32)


# Where the bits of value k (0..31) of a 32-value run live in a 3-bit run of three words:
# a list of (word, bit offset in word, number of bits, position in the value). This is the
# AutoGPTQ 3-bit layout: ten values per word, with values 10 and 21 split across words.
def _three_bit_table() -> list[list[tuple[int, int, int, int]]]:
    table = []
    for k in range(32):
        if k < 10:
            table.append([(0, 3 * k, 3, 0)])
        elif k == 10:
            table.append([(0, 30, 2, 0), (1, 0, 1, 2)])
        elif k < 21:
            table.append([(1, 3 * (k - 11) + 1, 3, 0)])
        elif k == 21:
            table.append([(1, 31, 1, 0), (2, 0, 2, 1)])
        else:
            table.append([(2, 3 * (k - 22) + 2, 3, 0)])
    return table


def unpack_gptq_axis0(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """GPTQ packing along axis 0 ([n·bits/32, m] int32 -> [n, m] codes)."""
    words = _u32(packed).astype(np.uint64)
    m = words.shape[1]
    out = np.zeros((n, m), dtype=np.int64)
    if bits in (2, 4, 8):
        per_word = 32 // bits
        mask = (1 << bits) - 1
        for i in range(n):
            out[i] = (words[i // per_word] >> np.uint64(bits * (i % per_word))) & np.uint64(mask)
    elif bits == 3:
        table = _three_bit_table()
        for i in range(n):
            run, k = divmod(i, 32)
            value = np.zeros(m, dtype=np.uint64)
            for word, offset, width, position in table[k]:
                piece = (words[3 * run + word] >> np.uint64(offset)) & np.uint64((1 << width) - 1)
                value |= piece << np.uint64(position)
            out[i] = value
    else:
        raise ValueError(f"GPTQ has no {bits}-bit layout")
    return out


def dequantize_gptq(tensors: dict[str, torch.Tensor], prefix: str, cfg: dict) -> dict[str, np.ndarray]:
    """Read module `prefix` of a GPTQ checkpoint; cfg is its quantize_config.json."""
    bits = cfg["bits"]
    qweight = tensors[f"{prefix}.qweight"]
    qzeros = tensors[f"{prefix}.qzeros"]
    scales = tensors[f"{prefix}.scales"]
    g_idx = tensors[f"{prefix}.g_idx"]
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert scales.dtype == torch.float16 and g_idx.dtype == torch.int32
    n_groups, out_features = scales.shape
    in_features = qweight.shape[0] * 32 // bits
    assert tuple(qweight.shape) == (in_features * bits // 32, out_features)
    assert tuple(qzeros.shape) == (n_groups, out_features * bits // 32)
    assert tuple(g_idx.shape) == (in_features,)

    codes = unpack_gptq_axis0(qweight, bits, in_features).T  # [out, in]
    zeros = unpack_gptq_axis0(qzeros.T.contiguous(), bits, out_features).T  # [G, out]
    if cfg["checkpoint_format"] == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    else:
        assert cfg["checkpoint_format"] == "gptq_v2"
    g = g_idx.numpy().astype(np.int64)
    s = scales.numpy().astype(np.float32)
    weight = s[g, :].T * (codes - zeros[g, :].T).astype(np.float32)
    return {"weight": weight, "codes": codes, "zeros": zeros.T, "scales": s.T, "g_idx": g}


def unpack_ct(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """compressed-tensors packing along the last axis ([m, ceil(n·bits/32)] -> [m, n] stored values).

    For 4 and 8 bits, 32/bits values fill each word from the lowest bits up."""
    assert bits in (4, 8)
    words = _u32(packed).astype(np.uint64)
    per_word = 32 // bits
    assert words.shape[1] == -(-n * bits // 32)
    out = np.zeros((words.shape[0], n), dtype=np.int64)
    for j in range(n):
        out[:, j] = (words[:, j // per_word] >> np.uint64(bits * (j % per_word))) & np.uint64((1 << bits) - 1)
    return out


def dequantize_ct(tensors: dict[str, torch.Tensor], prefix: str, qconfig: dict) -> dict[str, np.ndarray]:
    """Read module `prefix` of a compressed-tensors pack-quantized checkpoint."""
    (scheme,) = qconfig["config_groups"].values()
    args = scheme["weights"]
    bits = args["num_bits"]
    shape = tensors[f"{prefix}.weight_shape"]
    assert shape.dtype == torch.int64
    out_features, in_features = (int(x) for x in shape)
    packed = tensors[f"{prefix}.weight_packed"]
    scale = tensors[f"{prefix}.weight_scale"]
    assert packed.dtype == torch.int32
    n_groups = scale.shape[1]
    if args["strategy"] == "channel":
        assert n_groups == 1
        group_size = in_features
    else:
        group_size = args["group_size"]
        assert n_groups * group_size == in_features
    codes = unpack_ct(packed, bits, in_features)  # stored = signed value + 2^(bits-1)
    offset = 1 << (bits - 1)
    if args["symmetric"]:
        assert f"{prefix}.weight_zero_point" not in tensors
        zeros = np.full((out_features, n_groups), offset, dtype=np.int64)  # signed zero-point 0
    else:
        zp = tensors[f"{prefix}.weight_zero_point"]  # packed along the output dim
        zeros = unpack_ct(zp.T.contiguous(), bits, out_features).T
    group = np.arange(in_features) // group_size
    s = scale.float().numpy()
    weight = s[:, group] * (codes - zeros[:, group]).astype(np.float32)
    return {"weight": weight, "codes": codes, "zeros": zeros, "scales": s, "g_idx": group}
