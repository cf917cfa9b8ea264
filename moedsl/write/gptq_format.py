"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel "gptq" v1), one module at a time.

For a Linear with weight [out, in], quantized with G groups (docs/formats.md has the
details):

    qweight  int32 [in·bits/32, out]   codes packed along the input dim
    qzeros   int32 [G, out·bits/32]    zero-points packed along the output dim, stored as
                                       zero − 1 in v1 ("gptq"), as zero in "gptq_v2"
    scales   fp16  [G, out]
    g_idx    int32 [in]                group of each input column
    bias     copied if present

A loader computes  w[o, i] = scales[g, o] · (q[i, o] − z[g, o])  with g = g_idx[i].
"""

from __future__ import annotations

from typing import Literal

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack
from moedsl.write.pack import check_stack, pack_last, shape_problems, single_stack

GPTQ_BITS = (2, 3, 4, 8)
CheckpointFormat = Literal["gptq", "gptq_v2"]


def check_gptq_config(cfg: QuantConfig, checkpoint_format: str = "gptq") -> None:
    """What the GPTQ format cannot store, found before any work is done."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise MoedslError(
            f"unknown GPTQ checkpoint_format `{checkpoint_format}`", expected=["gptq", "gptq_v2"], code="write"
        )
    if cfg.bits not in GPTQ_BITS:
        raise MoedslError(
            f"the GPTQ format stores 2, 3, 4 or 8 bits, not {cfg.bits}", expected=[str(b) for b in GPTQ_BITS], code="write"
        )
    if cfg.scale_dtype != "float16":
        raise MoedslError(
            f"the GPTQ format stores scales in float16, but the config rounds them to {cfg.scale_dtype}; "
            "use QuantConfig(scale_dtype='float16') so the checkpoint holds exactly the quantizer's scales",
            code="write",
        )


def gptq_tensors(
    name: str,
    result: QuantResult,
    cfg: QuantConfig,
    bias: torch.Tensor | None = None,
    bias_dtype: torch.dtype = torch.float16,
    checkpoint_format: CheckpointFormat = "gptq",
) -> dict[str, torch.Tensor]:
    """The tensors of module `name` (local keys: qweight, qzeros, scales, g_idx, bias), on the CPU."""
    stack = single_stack(name, result, cfg, bias)
    return {k: v[0] for k, v in gptq_tensors_stacked([name], stack, cfg, bias_dtype, checkpoint_format).items()}


def gptq_tensors_stacked(
    names: list[str],
    stack: QuantStack,
    cfg: QuantConfig,
    bias_dtype: torch.dtype = torch.float16,
    checkpoint_format: CheckpointFormat = "gptq",
) -> dict[str, torch.Tensor]:
    """The tensors of n modules at once (one name per matrix of the stack), each [n, ...] and on
    the stack's device: every expert of a target packed in one pass."""
    check_gptq_config(cfg, checkpoint_format)
    out_features, in_features = check_stack(names, stack, cfg, scales_stored_in=torch.float16)
    bits = cfg.bits
    problems = shape_problems(out_features, in_features, cfg, "gptq")
    if problems:
        raise MoedslError(f"cannot write `{names[0]}` as {bits}-bit GPTQ: " + "; ".join(problems), code="write")

    zeros = stack.zeros
    if checkpoint_format == "gptq":
        # v1 stores zero − 1 and loaders add the 1 back, so a zero-point of 0 cannot be stored.
        at_zero = (zeros == 0).reshape(len(names), -1).any(dim=1)
        if bool(at_zero.any()):
            raise MoedslError(
                f"cannot write `{names[int(at_zero.int().argmax())]}` in the GPTQ v1 format: some zero-points are 0, "
                "which v1 stores as zero − 1 = −1 and no loader reads back correctly (asymmetric groups whose "
                "weights are all >= 0 do this)",
                notes=["use sym=True, checkpoint_format 'gptq_v2', or the compressed-tensors format"],
                code="write",
            )
        zeros = zeros - 1

    tensors = {
        "qweight": pack_last(stack.codes, bits).transpose(1, 2).contiguous(),  # [n, in·bits/32, out]
        "qzeros": pack_last(zeros.transpose(1, 2), bits),  # [n, G, out·bits/32]
        "scales": stack.scales.transpose(1, 2).to(torch.float16).contiguous(),  # [n, G, out]
        "g_idx": stack.g_idx.to(torch.int32, copy=True).contiguous(),
    }
    if stack.bias is not None:
        tensors["bias"] = stack.bias.detach().to(bias_dtype, copy=True).contiguous()
    return tensors


def gptq_quantize_config(
    cfg: QuantConfig, checkpoint_format: CheckpointFormat = "gptq", quantizer: str = "moedsl"
) -> dict:
    """quantize_config.json, also merged into config.json as `quantization_config`.

    desc_act tells loaders that g_idx must be honoured. It is true only when g_idx is not the
    trivial i // group_size: act_order with static groups (or per-channel) quantizes in
    activation order but stores groups in plain order, which loaders run faster.
    """
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.act_order and cfg.group_size != -1 and not cfg.static_groups,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "true_sequential": True,
        "damp_percent": cfg.damp_percent,
        "damp_auto_increment": cfg.damp_auto_increment,
        "lm_head": False,
        "pack_dtype": "int32",
        "checkpoint_format": checkpoint_format,
        "quant_method": "gptq",
        "meta": {"quantizer": [quantizer], "act_order": cfg.act_order},
    }
