"""The compressed-tensors `pack-quantized` layout (vLLM's native path), one module at a time.

For a Linear with weight [out, in] and G groups (docs/formats.md has the details):

    weight_packed      int32 [out, ceil(in·bits/32)]   codes packed along the input dim
    weight_scale       model dtype [out, G]            G = 1 for per-channel
    weight_shape       int64 [2]                       (out, in)
    weight_zero_point  int32 [ceil(out·bits/32), G]    asymmetric only, packed along the output dim

compressed-tensors thinks in signed values v in [−2^(bits−1), 2^(bits−1)) and packs v +
2^(bits−1); our unsigned codes are exactly those stored values, and a symmetric zero-point
(2^(bits−1)) is exactly its zero_point 0, which it does not store. Loaders compute
w = scale · ((v + off) − (zp + off)) = scale · (code − zero).

What this writer refuses (MoedslError), and why:
  * bits other than 4 and 8: vLLM's WNA16 kernels load only those.
  * act_order without static_groups for grouped weights: that needs a g_idx
    (actorder "group"), which compressed-tensors and vLLM have removed. With static groups the
    groups stay contiguous (actorder "weight") and no g_idx is needed.
  * asymmetric weights flagged as MoE experts: vLLM's compressed-tensors MoE kernels need a
    symmetric scheme (and one scheme for all experts of a layer, which one writer config
    guarantees).
"""

from __future__ import annotations

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack
from moedsl.write.pack import check_stack, pack_last, shape_problems, single_stack

CT_BITS = (4, 8)
FORMAT = "pack-quantized"


def check_ct_config(cfg: QuantConfig) -> None:
    if cfg.bits not in CT_BITS:
        raise MoedslError(
            f"the compressed-tensors writer stores 4 or 8 bits (what vLLM's WNA16 kernels load), not {cfg.bits}",
            expected=[str(b) for b in CT_BITS],
            code="write",
        )
    if cfg.act_order and cfg.group_size != -1 and not cfg.static_groups:
        raise MoedslError(
            "compressed-tensors cannot store act_order with dynamic groups: that needs a g_idx "
            "(actorder 'group'), which compressed-tensors and vLLM have removed",
            notes=["use static_groups=True (stored as actorder 'weight', no g_idx), or the GPTQ format"],
            code="write",
        )


def ct_tensors(
    name: str,
    result: QuantResult,
    cfg: QuantConfig,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    expert: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of module `name` (local keys: weight_packed, weight_scale, weight_shape,
    weight_zero_point when asymmetric, bias), on the CPU."""
    check_ct_config(cfg)
    stack = single_stack(name, result, cfg, bias)
    return {k: v[0] for k, v in ct_tensors_stacked([name], stack, cfg, dtype, expert).items()}


def ct_tensors_stacked(
    names: list[str],
    stack: QuantStack,
    cfg: QuantConfig,
    dtype: torch.dtype,
    expert: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of n modules at once (one name per matrix of the stack), each [n, ...] and on
    the stack's device."""
    check_ct_config(cfg)
    if expert and not cfg.sym:
        raise MoedslError(
            f"cannot write MoE expert `{names[0]}` asymmetrically in compressed-tensors: vLLM's MoE kernels "
            "for this format need symmetric weights",
            notes=["quantize experts with sym=True, or use the GPTQ format"],
            code="write",
        )
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MoedslError(f"cannot write `{names[0]}`: scales in {dtype} are not supported", code="write")
    out_features, in_features = check_stack(names, stack, cfg, scales_stored_in=dtype)
    problems = shape_problems(out_features, in_features, cfg, "compressed-tensors")
    if problems:
        raise MoedslError(f"cannot write `{names[0]}` in compressed-tensors: " + "; ".join(problems), code="write")

    n = len(names)
    tensors = {
        "weight_packed": pack_last(stack.codes, cfg.bits),  # [n, out, ceil(in·bits/32)]
        "weight_scale": stack.scales.detach().to(dtype, copy=True).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64,
                                     device=stack.codes.device).repeat(n, 1),
    }
    if not cfg.sym:  # packed along the output dim: [n, ceil(out·bits/32), G]
        tensors["weight_zero_point"] = pack_last(stack.zeros.transpose(1, 2), cfg.bits).transpose(1, 2).contiguous()
    if stack.bias is not None:
        tensors["bias"] = stack.bias.detach().to(dtype, copy=True).contiguous()
    return tensors


def ct_quantization_config(cfg: QuantConfig, ignore: list[str], targets: list[str] | None = None) -> dict:
    """`quantization_config` for config.json: one scheme for every quantized Linear.

    targets: default ["Linear"]; a quantized lm_head must be named too (`engines.targets_for`)."""
    grouped = cfg.group_size != -1
    weights = {
        "num_bits": cfg.bits,
        "type": "int",
        "symmetric": cfg.sym,
        "strategy": "group" if grouped else "channel",
        "group_size": cfg.group_size if grouped else None,
        "dynamic": False,
        "actorder": "weight" if (cfg.act_order and grouped) else None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": list(targets or ["Linear"]),
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": sorted(set(ignore)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
