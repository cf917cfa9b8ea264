"""Views between a fused expert tensor and per-role expert weights in nn.Linear orientation.

A fused tensor stores E experts' weights in one of four layouts (see `ir.FusedTensor`);
everything downstream (statistics, GPTQ, writers) works on `[E, out, in]` per role. `read`
gives that view (a copy when the layout needs one) and `write` puts a quantized `[E, out, in]`
back into the fused parameter in place, so the model is never unfolded into ModuleLists.
"""

from __future__ import annotations

import torch

from moedsl.errors import MoedslError


def canonical(param: torch.Tensor, layout: str, num_experts: int) -> torch.Tensor:
    """The whole fused parameter as `[E, out_total, in]` (a view where possible)."""
    if layout == "E,out,in":
        return param
    if layout == "E,in,out":
        return param.transpose(1, 2)
    if layout == "E*out,in":
        return param.view(num_experts, param.shape[0] // num_experts, param.shape[1])
    if layout == "E*in,out":
        return param.view(num_experts, param.shape[0] // num_experts, param.shape[1]).transpose(1, 2)
    raise MoedslError(f"unknown layout {layout!r}")


def _role_slice(total: int, split: str, roles: tuple[str, ...], role: str):
    k = roles.index(role)
    if split == "one":
        return slice(None)
    if split == "concat":
        half = total // 2
        return slice(k * half, (k + 1) * half)
    if split == "interleave":
        return slice(k, None, 2)
    raise MoedslError(f"unknown split {split!r}")


def read(param: torch.Tensor, layout: str, split: str, roles: tuple[str, ...], role: str, num_experts: int) -> torch.Tensor:
    """One role's weights, `[E, out, in]`."""
    full = canonical(param, layout, num_experts)
    return full[:, _role_slice(full.shape[1], split, roles, role), :]


def read_bias(bias: torch.Tensor, split: str, roles: tuple[str, ...], role: str) -> torch.Tensor:
    """One role's bias, `[E, out]` (biases are stored `[E, out_total]` in every layout)."""
    return bias[:, _role_slice(bias.shape[1], split, roles, role)]


@torch.no_grad()
def write(param: torch.Tensor, layout: str, split: str, roles: tuple[str, ...], role: str, num_experts: int,
          value: torch.Tensor, experts: torch.Tensor | slice = slice(None)) -> None:
    """Put `value` (`[E', out, in]`, for the experts selected by `experts`) into the fused parameter in place."""
    full = canonical(param.data, layout, num_experts)
    view = full[:, _role_slice(full.shape[1], split, roles, role), :]
    view[experts] = value.to(param.dtype)


def shape_of(param_shape: tuple[int, ...], layout: str, split: str, num_experts: int,
             extra: int = 0) -> tuple[int, int, int]:
    """(E, out, in) of ONE role of a fused parameter with this shape and layout, or an error. With `extra`
    weightless router slots, a 3-D tensor may also hold E + extra experts (their rows are never used)."""
    if layout in ("E,out,in", "E,in,out"):
        if len(param_shape) != 3:
            raise MoedslError(f"layout [{layout}] needs a 3-D tensor, this one is {list(param_shape)}")
        e, a, b = param_shape
        out_total, inp = (a, b) if layout == "E,out,in" else (b, a)
    else:
        if len(param_shape) != 2:
            raise MoedslError(f"flat layout [{layout}] needs a 2-D tensor, this one is {list(param_shape)}")
        if param_shape[0] % num_experts:
            raise MoedslError(f"flat layout [{layout}]: {param_shape[0]} rows do not split into {num_experts} experts")
        e = num_experts
        per = param_shape[0] // num_experts
        out_total, inp = (per, param_shape[1]) if layout == "E*out,in" else (param_shape[1], per)
    if e != num_experts and not (extra and e == num_experts + extra and layout in ("E,out,in", "E,in,out")):
        more = f" (or {num_experts + extra} with the extra slots)" if extra else ""
        raise MoedslError(f"tensor has {e} experts on its first axis, the config says {num_experts}{more}")
    if split != "one":
        if out_total % 2:
            raise MoedslError(f"cannot split an odd output size {out_total} into two projections")
        out_total //= 2
    return e, out_total, inp
