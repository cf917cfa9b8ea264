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


_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _finite_rows(W: torch.Tensor) -> torch.Tensor:
    """Per index along dim 0 of `W`, whether all its values are finite (a bool vector on W's device).

    A row's minimum and maximum are finite exactly when all its values are (both propagate NaN; -Inf
    and +Inf show in one of them): one reduction over the tensor, no full-size mask, and no wait for
    the device, so a whole layer is checked with a single synchronization."""
    flat = W.reshape(W.shape[0], -1) if W.dim() > 1 else W.reshape(-1, 1)
    if flat.numel() == 0:
        return torch.ones(flat.shape[0], dtype=torch.bool, device=W.device)
    if flat.dtype not in _MINMAX_DTYPES:  # e.g. FP8 parameters: no min/max kernels
        return torch.isfinite(flat).all(1)
    lo, hi = torch.aminmax(flat, dim=1)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _bad(ok: torch.Tensor) -> list[int]:
    return (~ok).nonzero().flatten().tolist()


@torch.no_grad()
def check_finite_layer(layer: torch.nn.Module, kind, i: int, layers_path: str) -> None:
    """Raise a `MoedslError` naming each weight of decoder layer `i` (plan kind `kind`) that holds NaN or Inf."""
    problems: list[str] = []
    seen: set[int] = set()
    prefix = f"{layers_path}.{i}."
    experts: list[tuple] = []  # (experts entry, role, finite rows)
    for moe in kind.moe:
        ex = moe.experts
        module = get_path(layer, ex.path)
        w, _ = expert_weights.read(ex, module)
        experts += [(ex, role, _finite_rows(W)) for role, W in w.items()]
        seen |= {id(p) for p in module.parameters()}
    others = [(name, _finite_rows(p)) for name, p in layer.named_parameters()
              if id(p) not in seen and p.is_floating_point()]
    flags = [ok for *_, ok in experts] + [ok for _, ok in others]
    if not flags or bool(torch.cat([f.to(flags[0].device) for f in flags]).all()):  # the one wait
        return
    for ex, role, ok in experts:
        bad = _bad(ok)
        if bad:
            names = [prefix + expand(ex.ckpt[role], e) + ".weight" for e in bad[:3]] if role in ex.ckpt else []
            problems.append(f"expert{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}"
                            f"{' …' if len(bad) > 8 else ''} of `{ex.path}`, target {role}"
                            + (f" (checkpoint {', '.join(names)})" if names else ""))
    for name, ok in others:
        rows = _bad(ok)
        if rows:
            what = name.removesuffix(".weight")
            problems.append(f"target {what} (checkpoint {prefix}{name}, row {rows[0]})")
    if problems:
        raise MoedslError(f"layer {i} ({kind.name}): NaN or infinite weights in " + "; ".join(problems[:8])
                          + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""),
                          notes=["the checkpoint is damaged, or was saved from a diverged model"])
