"""`moedsl validate`: check a definition against the real model classes of transformers.

Four checks, each reported by name:
- structure: every path binds, every stage names an nn.Linear, every fused tensor has its
  layout's shape, every quantizable weight is a target or skipped (see `bind`);
- expressions: the expert count, top-k, lets and layer-kind conditions evaluate for every layer;
- expert function: the declared `fn`/`scale` reproduces the experts module's own forward on
  small real weights and random inputs;
- checkpoint names: the names the definition gives every target are keys that
  `save_pretrained` really writes (or that the given model directory holds).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moedsl.bind.binder import bind, get_path
from moedsl.bind.bound import BoundDefinition, BoundExperts
from moedsl.errors import MoedslError, MoedslErrors, nearest
from moedsl.experts import fn as expert_fn
from moedsl.experts import weights as expert_weights
from moedsl.lang import ir
from moedsl.lang.ckpt_name import expand
from moedsl.lang.library import load
from moedsl.models.remote import is_remote_config
from moedsl.models.source import build, code_of, config_for


class Check(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: Literal["structure", "expressions", "expert function", "checkpoint names"]
    passed: bool
    detail: str = ""


class Report(BaseModel):
    model_config = ConfigDict(frozen=True)
    file: str
    arch: str
    model_type: str
    model_source: str
    ok: bool
    checks: tuple[Check, ...]
    problems: tuple[str, ...]
    kinds: dict[str, list[int]] = {}
    remote_code: dict[str, str] = {}  # the model directory's own code files that ran -> sha256


def validate(source: str | Path | ir.Definition, config: str | Path | None = None, model_dir: str | Path | None = None,
             model_type: str | None = None, trust_remote_code: bool = False) -> list[Report]:
    """Validate a definition (a file, a library name or a resolved IR); one report per model_type checked.
    `trust_remote_code`: a config or model directory may bring its own classes (`auto_map`)."""
    d = source if isinstance(source, ir.Definition) else load(source)
    file = str(d.source_file or source)
    if config is not None or model_dir is not None:
        types = [None]
    elif model_type is not None:
        types = [model_type]
    else:
        types = list(d.header.matches)
        if not types:
            raise MoedslError(f"`{d.header.name}` has no `match` and no model or config was given to check it against",
                              span=d.header.span)
    return [_validate_one(d, file, mt, Path(config) if config else None, Path(model_dir) if model_dir else None,
                          trust_remote_code) for mt in types]


def _validate_one(d: ir.Definition, file: str, model_type: str | None, config_path: Path | None,
                  model_dir: Path | None, trust: bool = False) -> Report:
    cfg, source = config_for(model_type, config_path, model_dir, trust)
    mt = str(getattr(cfg, "model_type", model_type))
    code = code_of(cfg) if trust else None
    ran = code.digests() if code is not None else {}
    checks: list[Check] = []
    problems: list[str] = []

    def record(name: str, errs: list[MoedslError], detail_ok: str) -> None:
        checks.append(Check(name=name, passed=not errs, detail=detail_ok if not errs else f"{len(errs)} problem(s)"))
        problems.extend(e.render() for e in errs)

    meta = build(cfg, "meta", trust)
    try:
        bound = bind(d, meta)
    except MoedslError as err:
        errs = err.errors if isinstance(err, MoedslErrors) else [err]
        expr_errs = [e for e in errs if "`when`" in e.message or e.message.startswith(("`experts`", "`top_k`"))]
        record("expressions", expr_errs, "")
        record("structure", [e for e in errs if e not in expr_errs], "")
        return Report(file=file, arch=d.header.name, model_type=mt, model_source=source, ok=False,
                      checks=tuple(checks), problems=tuple(problems), remote_code=ran)
    kinds = {k.name: list(k.layers) for k in bound.kinds}
    record("expressions", [], f"experts={bound.num_experts} top_k={bound.top_k}; "
           + ", ".join(f"{k}: layers {v}" for k, v in kinds.items()))
    n_targets = sum(len(k.linears) + len(k.grouped) + sum(len(m.experts.ckpt) for m in k.moe) for k in bound.kinds)
    record("structure", [], f"{len(bound.kinds)} layer kind(s), {n_targets} target kinds bound on {bound.model_class}")

    # numerics and checkpoint names need real weights: a tiny CPU model of the same model_type
    # (for a family with its own code: this config, shrunk, built by that code)
    from moedsl.models.tiny import shrink_like, tiny_config

    tiny_cfg = shrink_like(cfg) if is_remote_config(cfg) else tiny_config(mt)
    real = build(tiny_cfg, "cpu", trust)
    try:
        real_bound = bound if config_path is None and model_dir is None else bind(d, real)
    except MoedslError as err:
        errs = err.errors if isinstance(err, MoedslErrors) else [err]
        record("expert function", errs, "")
        return Report(file=file, arch=d.header.name, model_type=mt, model_source=source, ok=False,
                      checks=tuple(checks), problems=tuple(problems), kinds=kinds, remote_code=ran)
    fn_errs, fn_detail = check_expert_functions(d, real_bound, real)
    record("expert function", fn_errs, fn_detail)
    if model_dir is not None:
        keys = checkpoint_keys(model_dir)
        ck_errs, ck_detail = check_checkpoint_names(d, bound, keys, layer_prefixes(model_dir, bound))
    else:
        from moedsl.models.tiny import quiet_transformers, released_keys

        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():  # no "Writing model shards" bar
            real.save_pretrained(tmp)
            released_keys(Path(tmp), mt)  # as the family's releases name them, where save_pretrained does not
            keys = checkpoint_keys(Path(tmp))
            prefixes = layer_prefixes(Path(tmp), real_bound)
        ck_errs, ck_detail = check_checkpoint_names(d, real_bound, keys, prefixes)
    record("checkpoint names", ck_errs, ck_detail)
    return Report(file=file, arch=d.header.name, model_type=mt, model_source=source, ok=not problems,
                  checks=tuple(checks), problems=tuple(problems), kinds=kinds, remote_code=ran)


def checkpoint_keys(model_dir: Path) -> set[str]:
    """The checkpoint's tensor names as a bf16 checkpoint spells them (FP8 scales and MXFP4
    blocks/scales folded into the weights they make up)."""
    from moedsl.execute.loader import checkpoint_parts

    return set(checkpoint_parts(Path(model_dir)))


def _experts_item(d: ir.Definition, kind: str) -> ir.Module | None:
    layer = next(k for k in d.layers if k.name == kind)
    for it in ir.walk_items(layer.items):
        if isinstance(it, ir.Module) and it.role == "experts":
            return it
    return None


def layer_prefixes(model_dir: Path, bound: BoundDefinition) -> dict[int, str]:
    """What the checkpoint in `model_dir` calls the first layer of each kind (a composite's checkpoint may
    name its decoder layers differently from the runtime model: `thinker.model.layers.0.`)."""
    if bound.language_model is None:
        return {}
    from moedsl.execute.loader import LayerwiseLoader

    loader = LayerwiseLoader(model_dir, layers_path=bound.layers_path)
    loader.skeleton()
    return {k.layers[0]: loader.checkpoint_layer_prefix(k.layers[0]) for k in bound.kinds}


def check_checkpoint_names(d: ir.Definition, bound: BoundDefinition, keys: set[str],
                           prefixes: dict[int, str] | None = None) -> tuple[list[MoedslError], str]:
    errs: list[MoedslError] = []
    missing: list[tuple[str, int]] = []  # (name relative to the layer, layer index) of every name not found
    checked = 0
    root = bound.layers_ckpt or bound.layers_path
    for kind in bound.kinds:
        i = kind.layers[0]
        # a declared checkpoint root (`layers … @ "…"`) wins; else the prefix the loader read off the conversion
        declared = bound.layers_ckpt and bound.layers_ckpt != bound.layers_path
        prefix = f"{root}.{i}." if declared else (prefixes or {}).get(i, f"{root}.{i}.")
        layer_keys = sorted(k for k in keys if k.startswith(prefix))

        def want(key: str, node: Any) -> None:
            nonlocal checked
            checked += 1
            if key not in keys:
                missing.append((key[len(prefix):], i))
                near = nearest(key, layer_keys, cutoff=0.5)
                errs.append(MoedslError(f"checkpoint name `{key}` is not among the keys the checkpoint holds",
                                        span=getattr(node, "span", None), suggestion=near, code="checkpoint error"))

        layer_ir = next(k for k in d.layers if k.name == kind.name)
        for lin in kind.linears:
            want(prefix + lin.ckpt + ".weight", layer_ir)
        for g in kind.grouped:
            want(prefix + g.ckpt + ".weight", _item_at(d, kind.name, g.path))
        for moe in kind.moe:
            ex = moe.experts
            item = _experts_item(d, kind.name) or layer_ir
            if ex.ckpt_fused:
                for t in ex.tensors:
                    want(prefix + (t.ckpt or f"{ex.path}.{t.name}"), item)
                continue
            declared = {c.role: c for c in (item.children or ()) if isinstance(c, ir.Ckpt)} \
                if isinstance(item, ir.Module) else {}
            for role, template in ex.ckpt.items():
                for e in sorted({0, ex.num_experts - 1}):
                    want(prefix + expand(template, e) + ".weight", declared.get(role, item))
    other = _other_root(missing, checked, root, keys)
    if other is not None:  # one error at the `layers` statement, not one per name
        span = d.header.spans.get("layers", d.header.span)
        hint = f'layers {bound.layers_path} @ "{other}"' if other != bound.layers_path else f"layers {other}"
        return [MoedslError(
            f"none of the {checked} checkpoint names is in the checkpoint, but every one is there under the root "
            f"`{other}` instead of `{root}`: the checkpoint stores the decoder layers as `{other}.N`",
            span=span, suggestion=hint, code="checkpoint error",
            notes=[f"e.g. `{root}.{missing[0][1]}.{missing[0][0]}` is `{other}.{missing[0][1]}.{missing[0][0]}`"])], \
            f"{checked} checkpoint names under another root"
    return errs, f"{checked} checkpoint keys found"


def _other_root(missing: list[tuple[str, int]], checked: int, root: str, keys: set[str]) -> str | None:
    """The one other root (`backbone.layers`) under which every missing layer key exists, if all are missing."""
    if not missing or len(missing) != checked:
        return None
    rel, i = missing[0]
    tail = f".{i}.{rel}"
    candidates = {k[: -len(tail)] for k in keys if k.endswith(tail) and len(k) > len(tail)}
    for cand in sorted(candidates):
        if cand != root and all(f"{cand}.{j}.{r}" in keys for r, j in missing):
            return cand
    return None


@torch.no_grad()
def run_experts_module(ex: BoundExperts, module: nn.Module, x: torch.Tensor, index: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """Call the experts module itself the way its block does, per the declared `call(...)`."""
    T = x.shape[0]
    if ex.call == ("hidden",):  # all experts on a stacked, pre-scaled input (llama4)
        dense = torch.zeros(T, ex.num_experts, dtype=x.dtype)
        dense.scatter_(1, index, weights.to(x.dtype))
        stacked = x.repeat(ex.num_experts, 1) * dense.t().reshape(-1, 1)
        return module(stacked).view(ex.num_experts, T, -1).sum(0)
    args = []
    for a in ex.call:
        if a == "hidden":
            args.append(x)
        elif a == "index":
            args.append(index)
        elif a == "weights":
            args.append(weights.to(x.dtype))
        elif a == "scores":
            dense = torch.zeros(T, ex.num_experts, dtype=x.dtype)
            dense.scatter_(1, index, weights.to(x.dtype))
            args.append(dense)
        else:
            args.append(None)
    out = module(*args)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(T, -1)


@torch.no_grad()
def declared_output(ex: BoundExperts, module: nn.Module, x: torch.Tensor, index: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    w, b = expert_weights.read(ex, module)
    if ex.scale == "input":
        dense = torch.zeros(x.shape[0], ex.num_experts, dtype=x.dtype)
        dense.scatter_(1, index, weights.to(x.dtype))
        xs = x[None] * dense.t()[:, :, None]  # [E, T, H]: each expert reads its own scaled input
        per = expert_fn.output(xs, ex.fn, w, b)
        return per.sum(0)
    per = expert_fn.output(x, ex.fn, w, b)
    if ex.slots:  # weightless slots after the experts: an identity slot's output is its input, a zero slot's zero
        extra = torch.stack([x if s == "identity" else torch.zeros_like(x) for s in ex.slots])
        per = torch.cat([per, extra.to(per.dtype)])
    return expert_fn.combine(per, index, weights)


def _item_at(d: ir.Definition, kind: str, path: str) -> Any:
    """The IR module of a layer kind at `path` (for a located message), else the kind."""
    layer = next(k for k in d.layers if k.name == kind)

    def find(items: tuple, prefix: str):
        for it in items:
            if isinstance(it, ir.Module):
                for n in it.names:
                    full = ir.join_path(prefix, n)
                    if full == path:
                        return it
                    if it.children and path.startswith(full + "."):
                        hit = find(it.children, full)
                        if hit is not None:
                            return hit
        return None

    return find(layer.items, "") or layer


@torch.no_grad()
def grouped_contract_error(container: nn.Module, weight: torch.Tensor, gen: torch.Generator) -> float:
    """Relative error between `container(rows, sizes)` and expert e's rows times weight[e]ᵀ, expert by expert
    (weight: the container's [E, out, in] view), on random rows in uneven groups (one expert gets none)."""
    E = weight.shape[0]
    sizes = torch.randint(1, 6, (E,), generator=gen)
    sizes[E // 2] = 0
    rows = torch.randn(int(sizes.sum()), weight.shape[2], generator=gen, dtype=weight.dtype)
    theirs = container(rows, sizes.tolist())
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    ours = torch.cat([part @ weight[e].t() for e, part in enumerate(rows.split(sizes.tolist()))])
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def grouped_experts_error(ex: BoundExperts, block: nn.Module, x: torch.Tensor) -> float:
    """Grouped experts: run the block on x and compare what its down container returns, row by row, with
    the declared expert function on the rows the first container received (same routing, same order)."""
    first = get_path(block, ex.container(ex.first_role))
    last = get_path(block, ex.container("down"))
    seen: dict[str, Any] = {}
    h1 = first.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a))
    h2 = last.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        block(x[None])
    finally:
        h1.remove()
        h2.remove()
    rows, sizes = seen["in"][0], seen["in"][1]
    sizes = sizes.tolist() if torch.is_tensor(sizes) else list(sizes)
    w, b = expert_weights.read(ex, block)
    ours = torch.cat([expert_fn.output(part, ex.fn, *expert_weights.one(w, b, e))[0]
                      for e, part in enumerate(rows.split(sizes))])
    theirs = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-12)).item()


def check_grouped(d: ir.Definition, bound: BoundDefinition, model: nn.Module,
                  gen: torch.Generator) -> tuple[list[MoedslError], list[str]]:
    """Every grouped container (`:grouped` targets, and the containers of `call(rows, sizes)` experts) is
    called as `(rows, sizes)` and multiplies expert e's rows by its slice of the declared layout."""
    from moedsl.experts import layout as fused

    errs: list[MoedslError] = []
    details: list[str] = []
    layers = get_path(model, bound.layers_path)
    for kind in bound.kinds:
        layer = layers[kind.layers[0]]
        checks = [(g.path, get_path(layer, g.path), get_path(layer, g.path).weight, g.module_class) for g in kind.grouped]
        for moe in kind.moe:
            ex = moe.experts
            if ex.grouped:
                block = get_path(layer, ex.path)
                for t in ex.tensors:
                    owner = t.name.rpartition(".")[0]
                    container = get_path(block, owner)
                    weight = fused.canonical(get_path(block, t.name), t.layout, t.stored_experts or ex.num_experts)
                    checks.append((f"{ex.path}.{owner}", container, weight, type(container).__name__))
        for path, container, weight, cls in checks:
            where = _item_at(d, kind.name, path)
            try:
                rel = grouped_contract_error(container, weight.float(), gen)
            except Exception as err:  # the container refusing (rows, sizes) is a definition problem
                errs.append(MoedslError(f"calling {cls} `{path}` as `(rows, sizes)` failed: {err}", span=where.span,
                                        code="fn error"))
                continue
            details.append(f"{kind.name}: `{path}` (rows, sizes) rel. error {rel:.1e}")
            if not rel < 1e-4:
                errs.append(MoedslError(
                    f"`{path}` ({cls}) called as `(rows, sizes)` does not multiply expert e's rows by its [E, out, in] "
                    f"weight (relative error {rel:.2e}) in layer {kind.layers[0]}", span=where.span, code="fn error",
                    notes=["a grouped container's weight is [E, out, in]: check the tensor's layout"]))
    return errs, details


def check_expert_functions(d: ir.Definition, bound: BoundDefinition, model: nn.Module) -> tuple[list[MoedslError], str]:
    gen = torch.Generator().manual_seed(0)
    errs, details = check_grouped(d, bound, model, gen)
    layers = get_path(model, bound.layers_path)
    for kind in bound.kinds:
        for moe in kind.moe:
            ex = moe.experts
            module = get_path(layers[kind.layers[0]], ex.path)
            if ex.grouped:
                x = torch.randn(24, ex.hidden_size, generator=gen)
                rel = grouped_experts_error(ex, module, x)
                details.append(f"{kind.name}: rel. error {rel:.1e}")
                if not rel < 1e-4:
                    fn_item = next((c for c in (_item_at(d, kind.name, ex.path).children or ())
                                    if isinstance(c, ir.ExpertFn)), None)
                    errs.append(MoedslError(
                        f"the declared expert function does not match what {ex.module_class}'s containers compute "
                        f"in layer {kind.layers[0]} (relative error {rel:.2e})", span=(fn_item or d.header).span,
                        code="fn error", notes=["check `fn`, the tensor layouts and the gate/up split (concat vs "
                                                "interleave)"]))
                continue
            slots = ex.num_experts + len(ex.slots)  # the router also picks the weightless extra slots
            T, k = 24, min(bound.top_k or 2, slots)
            x = torch.randn(T, ex.hidden_size, generator=gen)
            index = torch.stack([torch.randperm(slots, generator=gen)[:k] for _ in range(T)])
            weights = torch.rand(T, k, generator=gen) + 0.1
            try:
                theirs = run_experts_module(ex, module, x, index, weights)
            except Exception as err:  # the module's own forward refusing our call is a definition problem
                errs.append(MoedslError(f"calling {ex.module_class} as `call({', '.join(ex.call)})` failed: {err}",
                                        span=(_experts_item(d, kind.name) or d.header).span, code="fn error"))
                continue
            ours = declared_output(ex, module, x, index, weights)
            rel = ((ours - theirs).norm() / theirs.norm().clamp_min(1e-12)).item()
            details.append(f"{kind.name}: rel. error {rel:.1e}")
            if not rel < 1e-4:
                fn_item = next((c for c in (_experts_item(d, kind.name).children or ()) if isinstance(c, ir.ExpertFn)), None)
                errs.append(MoedslError(
                    f"the declared expert function does not match {ex.module_class}.forward in layer "
                    f"{kind.layers[0]} (relative error {rel:.2e})", span=(fn_item or d.header).span, code="fn error",
                    notes=["check `fn`, `scale`, the tensor layouts and the gate/up split (concat vs interleave)"]))
    return errs, "; ".join(details) or "no MoE blocks"
