"""The expert function, as the `.moedef` declares it, in batched form over all experts.

`hidden(x, W, fn)` is what each expert's down projection reads: for `glu`,
act(x·W_gateᵀ) ⊙ (x·W_upᵀ); for `mlp`, act(x·W_upᵀ); for gpt-oss's clamped SwiGLU,
(clamp(up)+1) ⊙ g·σ(α·g) with g = min(gate, limit). `output` adds the down projection. The
executor uses these to give every expert every token with one batched matmul per role;
`validate` checks them against the experts module's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moedsl.lang import ir


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(name)  # the parser only admits the names above


def _proj(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # x [E, T, in] or [T, in]; w [E, out, in]; b [E, out]
    y = torch.matmul(x, w.transpose(1, 2))
    return y if b is None else y + b[:, None, :]


def _adjacent(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """`[E, 2·out, in]` over both when second's rows follow first's in one tensor, else None.

    Fused checkpoints (transformers' `gate_up_proj`) hold gate and up as the two halves of one
    `[E, 2I, H]` tensor; one product over it reads x once and gives the tensor cores twice the width.
    """
    if (first.shape != second.shape or first.stride() != second.stride() or first.dim() != 3
            or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
            or second.storage_offset() != first.storage_offset() + first.shape[1] * first.stride(1)):
        return None
    E, out, inner = first.shape
    return first.as_strided((E, 2 * out, inner), first.stride())


def _gate_up(x: torch.Tensor, w: dict[str, torch.Tensor], b: dict[str, torch.Tensor | None]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    both = _adjacent(w["gate"], w["up"])
    if both is None:
        return _proj(x, w["gate"], b.get("gate")), _proj(x, w["up"], b.get("up"))
    gate, up = torch.matmul(x, both.transpose(1, 2)).chunk(2, dim=-1)
    gb, ub = b.get("gate"), b.get("up")
    return (gate if gb is None else gate + gb[:, None, :]), (up if ub is None else up + ub[:, None, :])


def hidden(x: torch.Tensor, fn: ir.ExpertFn, w: dict[str, torch.Tensor], b: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The down projection's input for every expert: `[E, T, I]` from x `[T, H]` (or `[E, T, H]`)."""
    if fn.form == "mlp":
        return activation(fn.act, _proj(x, w["up"], b.get("up")))
    gate, up = _gate_up(x, w, b)
    if fn.form == "glu":
        return activation(fn.act, gate) * up
    g = gate.clamp(max=fn.limit)
    u = up.clamp(min=-fn.limit, max=fn.limit)
    return (u + 1) * (g * torch.sigmoid(g * fn.alpha))


def output(x: torch.Tensor, fn: ir.ExpertFn, w: dict[str, torch.Tensor], b: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Every expert's output on every token: `[E, T, H]`."""
    return _proj(hidden(x, fn, w, b), w["down"], b.get("down"))


def combine(per_expert: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed output: Σ_k weights[t,k] · per_expert[index[t,k], t]  (`[T, H]`)."""
    t = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    picked = per_expert[index, t]  # [T, k, H]
    return (picked * weights[..., None].to(picked.dtype)).sum(dim=1)
