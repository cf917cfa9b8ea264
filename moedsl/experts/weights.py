"""Every expert's weights of one bound experts module, by role, whatever its storage.

Fused tensors and ModuleLists alike read as `[E, out, in]` per role (biases `[E, out]`) and are
written back in place, so statistics, GPTQ and `validate` never look at the storage.
"""

from __future__ import annotations

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.bind.bound import BoundExperts
from moedsl.experts import layout as fused

Weights = dict[str, torch.Tensor]
Biases = dict[str, torch.Tensor | None]


def _member(ex: BoundExperts, path: str) -> str:
    """A ModuleList expert's linear, relative to one expert (`experts.0.w1` → `w1`)."""
    return path[len(ex.path) + 1:].split(".", 1)[1]


@torch.no_grad()
def read(ex: BoundExperts, module: nn.Module) -> tuple[Weights, Biases]:
    """Every role's weights `[E, out, in]` and biases `[E, out]` (views of fused tensors)."""
    w: Weights = {}
    b: Biases = {}
    E = ex.num_experts
    for t in ex.tensors:
        p = get_path(module, t.name)
        bias = get_path(module, t.bias) if t.bias else None
        for role in t.roles:  # rows of weightless extra slots (LongCat's gate_up_proj) are left out: [:E]
            w[role] = fused.read(p, t.layout, t.split, t.roles, role, E)[:E]
            b[role] = fused.read_bias(bias, t.split, t.roles, role)[:E] if bias is not None else None
    for lin in ex.module_list:
        mods = [get_path(module, f"{e}.{_member(ex, lin.path)}") for e in range(ex.num_experts)]
        w[lin.proj] = torch.stack([m.weight for m in mods])
        b[lin.proj] = torch.stack([m.bias for m in mods]) if mods[0].bias is not None else None
    return w, b


@torch.no_grad()
def write(ex: BoundExperts, module: nn.Module, role: str, value: torch.Tensor, experts: slice) -> None:
    """Put `value` (`[E', out, in]`, the experts in `experts`) into the module's `role` weights in place."""
    for t in ex.tensors:
        if role in t.roles:
            fused.write(get_path(module, t.name), t.layout, t.split, t.roles, role, ex.num_experts, value, experts)
            return
    lin = next(l for l in ex.module_list if l.proj == role)
    for q, e in zip(value, range(experts.start, experts.stop)):
        get_path(module, f"{e}.{_member(ex, lin.path)}").weight.data.copy_(q)


def one(w: Weights, b: Biases, e: int) -> tuple[Weights, Biases]:
    """Expert e's weights alone, keeping the leading expert axis (`[1, out, in]`)."""
    return ({r: t[e:e + 1] for r, t in w.items()},
            {r: (t[e:e + 1] if t is not None else None) for r, t in b.items()})
