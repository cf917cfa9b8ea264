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

from moedsl.experts.silu_mul import silu_mul
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


def hidden(x: torch.Tensor, fn: ir.ExpertFn, w: dict[str, torch.Tensor], b: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The down projection's input for every expert: `[E, T, I]` from x `[T, H]` (or `[E, T, H]`)."""
    up = _proj(x, w["up"], b.get("up"))
    if fn.form == "mlp":
        return activation(fn.act, up)
    gate = _proj(x, w["gate"], b.get("gate"))
    if fn.form == "glu":
        if fn.act == "silu":
            return silu_mul(gate, up)  # one kernel on CUDA, the same values
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
