"""NaN and Inf in a loaded layer's weights, named by layer, target and expert.

A non-finite weight poisons every activation after it, so a layer is checked as soon as it is
loaded, before its forward; the error names what a user can find in the checkpoint.
"""

from __future__ import annotations

import torch

from moedsl.bind.binder import get_path
from moedsl.errors import MoedslError
from moedsl.experts import weights as expert_weights
from moedsl.lang.ckpt_name import expand


def _bad_rows(W: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Indices along dim 0 of `W` that hold a non-finite value (checked in chunks: no full-size mask)."""
    flat = W.reshape(W.shape[0], -1) if W.dim() > 1 else W.reshape(-1, 1)
    bad = [i + j for i in range(0, flat.shape[0], chunk)
           for j in (~torch.isfinite(flat[i:i + chunk])).any(1).nonzero().flatten().tolist()]
    return torch.tensor(bad, dtype=torch.long)


@torch.no_grad()
def check_finite_layer(layer: torch.nn.Module, kind, i: int, layers_path: str) -> None:
    """Raise a `MoedslError` naming each weight of decoder layer `i` (plan kind `kind`) that holds NaN or Inf."""
    problems: list[str] = []
    seen: set[int] = set()
    prefix = f"{layers_path}.{i}."
    for moe in kind.moe:
        ex = moe.experts
        module = get_path(layer, ex.path)
        w, _ = expert_weights.read(ex, module)
        for role, W in w.items():
            experts = _bad_rows(W).tolist()
            if experts:
                names = [prefix + expand(ex.ckpt[role], e) + ".weight" for e in experts[:3]] if role in ex.ckpt else []
                problems.append(f"expert{'s' if len(experts) > 1 else ''} {', '.join(map(str, experts[:8]))}"
                                f"{' …' if len(experts) > 8 else ''} of `{ex.path}`, target {role}"
                                + (f" (checkpoint {', '.join(names)})" if names else ""))
        seen |= {id(p) for p in module.parameters()}
    for name, p in layer.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        rows = _bad_rows(p)
        if len(rows):
            what = name.removesuffix(".weight")
            problems.append(f"target {what} (checkpoint {prefix}{name}, row {int(rows[0])})")
    if problems:
        raise MoedslError(f"layer {i} ({kind.name}): NaN or infinite weights in " + "; ".join(problems[:8])
                          + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""),
                          notes=["the checkpoint is damaged, or was saved from a diverged model"])
