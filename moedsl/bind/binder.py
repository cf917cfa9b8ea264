"""Binding a resolved definition to a model instance (the meta device is enough).

Every path must resolve (`:?` paths may be absent), every stage must name an nn.Linear,
every fused tensor must have the shape its layout says, and every quantizable weight of
a layer must be a target or be skipped. All problems of one model are collected and
raised together, each pointing at the line of the definition that made it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moedsl.bind.bound import (BoundDefinition, BoundExperts, BoundGrouped, BoundKind, BoundLinear, BoundMoe,
                                BoundTensor)
from moedsl.errors import MoedslError, MoedslErrors, nearest
from moedsl.experts import layout as fused
from moedsl.lang import ir
from moedsl.lang.expr import Env, evaluate

_NOT_QUANTIZABLE = (nn.Embedding, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm)


def is_quantizable(module: nn.Module, pname: str, param: torch.Tensor) -> bool:
    """nn.Linear weights, and other ≥2-D weights outside embeddings, convolutions and norms."""
    if isinstance(module, nn.Linear):
        return pname == "weight"
    if isinstance(module, _NOT_QUANTIZABLE) or "norm" in type(module).__name__.lower():
        return False
    return param.dim() >= 2


def get_path(root: nn.Module, path: str) -> nn.Module | torch.Tensor | None:
    """The submodule, parameter or buffer at a dotted path, or None."""
    obj: Any = root
    for part in path.split("."):
        if isinstance(obj, nn.Module):
            if part in obj._modules:
                obj = obj._modules[part]
            elif part in obj._parameters:
                obj = obj._parameters[part]
            elif part in obj._buffers:
                obj = obj._buffers[part]
            else:
                return None
        else:
            return None
        if obj is None:
            return None
    return obj


def _children_names(module: Any) -> list[str]:
    if not isinstance(module, nn.Module):
        return []
    return [*module._modules, *module._parameters, *module._buffers]


@dataclass
class _LayerBinding:
    """What one decoder layer's walk found."""

    linears: list[BoundLinear] = field(default_factory=list)
    moe: list[BoundMoe] = field(default_factory=list)
    grouped: list[BoundGrouped] = field(default_factory=list)
    covered: set[str] = field(default_factory=set)  # parameter names (relative to the layer) accounted for
    skipped: list[str] = field(default_factory=list)


class Binder:
    def __init__(self, d: ir.Definition, model: nn.Module):
        self.d = d
        self.model = model
        self.config = getattr(model, "config", None)
        self.errors: list[MoedslError] = []
        self.model_class = type(model).__name__
        self.config = self.text_config(d.header, self.config)
        self.env = Env(self.config, None, {l.name: l.value for l in d.lets})

    def fail(self, message: str, node: Any = None, **kw) -> None:
        self.errors.append(MoedslError(message, span=getattr(node, "span", None), code="bind error", **kw))

    # -- top level ---------------------------------------------------------------------------

    def bind(self) -> BoundDefinition:
        h = self.d.header
        self.refuse_unmarked_composite(h)
        layers_path, layers = self.root_path(h.layers, "layers", h)
        if layers is not None and not isinstance(layers, nn.ModuleList):
            self.fail(f"`layers {layers_path}` is a {type(layers).__name__}, not a ModuleList of decoder layers", h)
            layers = None
        embed = self.root_path(h.embed, "embed", h)[0] if h.embed else None
        norm = self.root_path(h.final_norm, "final_norm", h)[0] if h.final_norm else None
        head = self.root_path(h.lm_head, "lm_head", h)[0] if h.lm_head else None
        language_model, towers = self.composite(h, layers_path)
        if layers is None:
            raise MoedslErrors(self.errors)
        kind_of_layer = self.assign_kinds(len(layers))
        # the expert count and top-k matter only where a `:moe` layer kind is used: a dense variant of
        # a MoE family (`num_local_experts = 0`, every layer dense) has no experts to count
        used = set(kind_of_layer)
        moe_used = any(_has_moe(k.items) for k in self.d.layers if k.name in used)
        num_experts = self.header_int(h.experts, "experts") if moe_used else None
        top_k = self.header_int(h.top_k, "top_k") if moe_used else None
        for name in h.carry:
            params = inspect.signature(type(layers[0]).forward).parameters
            if name not in params:
                self.fail(f"`carry {name}`: {type(layers[0]).__name__}.forward takes no argument `{name}`", h,
                          suggestion=nearest(name, [p for p in params if p != "self"]))
        kinds = []
        for kind in self.d.layers:
            indices = tuple(i for i, k in enumerate(kind_of_layer) if k == kind.name)
            if not indices:
                continue
            first: _LayerBinding | None = None
            for i in indices:
                errors_before = len(self.errors)
                b = self.bind_layer(kind, layers[i], i, num_experts)
                if first is None:
                    first = b
                if len(self.errors) > errors_before:
                    break  # one broken layer of a kind is enough to report
            assert first is not None
            kinds.append(BoundKind(name=kind.name, layers=indices, layer_class=type(layers[indices[0]]).__name__,
                                   linears=tuple(first.linears), moe=tuple(first.moe), grouped=tuple(first.grouped),
                                   skipped=tuple(first.skipped)))
        if self.errors:
            raise MoedslErrors(self.errors) if len(self.errors) > 1 else self.errors[0]
        hidden = getattr(self.config, "hidden_size", None) or getattr(self.config, "d_model", 0)
        return BoundDefinition(
            arch=h.name, model_type=str(getattr(getattr(self.model, "config", None), "model_type", "")),  # the composite's
            model_class=self.model_class, num_layers=len(layers), layers_path=layers_path,
            layers_ckpt=h.layers_ckpt or layers_path, embed=embed, final_norm=norm, lm_head=head,
            num_experts=num_experts, top_k=top_k, hidden_size=int(hidden or 0), carry=h.carry, kinds=tuple(kinds),
            kind_of_layer=tuple(kind_of_layer), language_model=language_model, towers=towers)

    def root_path(self, alts: tuple[str, ...] | None, word: str, node: Any) -> tuple[str | None, Any]:
        for alt in alts or ():
            obj = get_path(self.model, alt)
            if obj is not None:
                return alt, obj
        tried = " | ".join(alts or ())
        top = [n for n, _ in self.model.named_modules() if n.count(".") < 2 and n]
        notes = [f"top-level modules: {' '.join(top[:12])}"]
        last = (alts or ("",))[0].rpartition(".")[2]
        elsewhere = [n for n, _ in self.model.named_modules() if n.rpartition(".")[2] == last][:4]
        if elsewhere:  # a composite model keeps its text decoder deeper (`model.language_model.layers`)
            notes.append(f"`{last}` exists at: {', '.join(elsewhere)}")
        self.fail(f"`{word} {tried}` does not exist in {self.model_class}", node,
                  suggestion=elsewhere[0] if len(elsewhere) == 1 else nearest((alts or ("",))[0], top), notes=notes)
        return None, None

    # -- composite models ----------------------------------------------------------------------

    def refuse_unmarked_composite(self, h: ir.Header) -> None:
        """A definition of a text model bound to a composite one: say so once, not as a dozen missing paths."""
        from moedsl.models.tiny import is_composite

        config = getattr(self.model, "config", None)
        if h.language_model is not None or config is None or not is_composite(config):
            return
        subs = [k for k in (getattr(config, "sub_configs", None) or {}) if getattr(config, k, None) is not None]
        decoders = [n for n, m in self.model.named_modules()
                    if isinstance(m, nn.ModuleList) and n.rpartition(".")[2] == "layers"][:3]
        self.fail(f"{self.model_class} is a composite model (sub-configs: {', '.join(subs)}), but `{h.name}` "
                  "does not say where its language model is", h,
                  notes=[f"decoder layers found at: {', '.join(decoders) or '(none)'}",
                         "declare `language_model PATH`, `text_config EXPR` and `towers PATH, ...` (docs/language.md, "
                         "composite models), or use the library's definition for this model_type"])
        raise MoedslErrors(self.errors)

    def text_config(self, h: ir.Header, config: Any) -> Any:
        """What `config` means in the definition's expressions: the model's config, or the sub-config
        that `text_config` names (a composite's text decoder config)."""
        if h.text_config is None:
            return config
        try:
            sub = evaluate(h.text_config, Env(config, None, {}))
        except MoedslError as err:
            err.message = f"`text_config`: {err.message}"
            err.code = "bind error"
            self.errors.append(err)
            return config
        if sub is None or isinstance(sub, (bool, int, float, str, list)):
            self.fail(f"`text_config` must name a sub-config of {type(config).__name__}; it is {sub!r}", h.text_config)
            return config
        return sub

    def composite(self, h: ir.Header, layers_path: str | None) -> tuple[str | None, tuple[str, ...]]:
        """`language_model` and `towers`: where the text decoder sits, and that every parameter outside
        it (and outside embed, final_norm and lm_head) belongs to a declared tower."""
        if h.language_model is None:
            if h.towers:
                self.fail("`towers` needs `language_model` (the part of the model that is quantized)", h)
            return None, ()
        lm_path, lm = self.root_path(h.language_model, "language_model", h)
        if lm_path is None:
            return None, ()
        if not isinstance(lm, nn.Module):
            self.fail(f"`language_model {lm_path}` is a tensor, not a module", h)
            return None, ()
        if layers_path is not None and not layers_path.startswith(lm_path + "."):
            self.fail(f"`layers {layers_path}` is not inside `language_model {lm_path}`", h,
                      notes=["calibration runs the language model, so its decoder layers must be part of it"])
        towers: list[str] = []
        for tower in h.towers:
            found = next((n for n in tower.names if get_path(self.model, n) is not None), None)
            if found is None:
                if not tower.optional:
                    top = [n for n, _ in self.model.named_modules() if n.count(".") < 3 and n]
                    self.fail(f"tower `{'|'.join(tower.names)}` does not exist in {self.model_class}", tower,
                              suggestion=nearest(tower.names[0], top),
                              notes=["mark it `:?` if some checkpoints lack it"])
                continue
            if found == lm_path or found.startswith(lm_path + ".") or lm_path.startswith(found + "."):
                self.fail(f"tower `{found}` overlaps `language_model {lm_path}`", tower)
                continue
            towers.append(found)
        kept = [lm_path, *towers, *(p for p in (self.root_path_quiet(h.embed), self.root_path_quiet(h.final_norm),
                                                 self.root_path_quiet(h.lm_head)) if p)]
        loose: dict[str, int] = {}
        for name, _ in self.model.named_parameters():
            if not any(name == k or name.startswith(k + ".") for k in kept):
                # name the module where the parameter's path leaves every declared one (`thinker.model.audio_tower`)
                parts = name.split(".")
                shared = max(_common_parts(parts, k.split(".")) for k in kept)
                top = ".".join(parts[:shared + 1])
                loose[top] = loose.get(top, 0) + 1
        for top, n in loose.items():
            self.fail(f"`{top}` ({n} parameter(s)) is outside `language_model {lm_path}` and in no tower", h,
                      notes=["add it to `towers` to copy it unquantized, byte for byte"])
        return lm_path, tuple(towers)

    def root_path_quiet(self, alts: tuple[str, ...] | None) -> str | None:
        return next((a for a in alts or () if get_path(self.model, a) is not None), None)

    def header_int(self, e: ir.Expr | None, word: str) -> int | None:
        if e is None:
            return None
        try:
            v = evaluate(e, self.env)
        except MoedslError as err:
            err.message = f"`{word}`: {err.message}"
            err.code = "bind error"
            self.errors.append(err)
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            self.fail(f"`{word}` must be a positive integer; for {self.model_class} it is {v!r}", e)
            return None
        return v

    def assign_kinds(self, n: int) -> list[str]:
        out = []
        for i in range(n):
            env = self.env.at(i)
            chosen = None
            for kind in self.d.layers:
                if kind.when is None:
                    chosen = kind.name
                    break
                try:
                    hit = evaluate(kind.when, env)
                except MoedslError as err:
                    err.message = f"layer {i}, `when` of kind `{kind.name}`: {err.message}"
                    err.code = "bind error"
                    self.errors.append(err)
                    raise MoedslErrors(self.errors) from None
                if not isinstance(hit, bool):
                    self.fail(f"`when` of layer kind `{kind.name}` must be true or false; for layer {i} it is {hit!r}",
                              kind.when)
                    raise MoedslErrors(self.errors)
                if hit:
                    chosen = kind.name
                    break
            if chosen is None:
                self.fail(f"layer {i} matches no layer kind (add an `otherwise` kind?)", self.d.header)
                raise MoedslErrors(self.errors)
            out.append(chosen)
        return out

    # -- one layer ---------------------------------------------------------------------------

    def bind_layer(self, kind: ir.LayerKind, layer: nn.Module, i: int, num_experts: int | None) -> _LayerBinding:
        b = _LayerBinding()
        self.where = f"layer {i} of {self.model_class} (kind `{kind.name}`)"
        self.walk(kind.items, layer, "", b, shared=False, moe_path=None, num_experts=num_experts)
        # every quantizable weight is a target or skipped
        for mname, module in layer.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = ir.join_path(mname, pname)
                if full in b.covered or not is_quantizable(module, pname, p):
                    continue
                if any(full.startswith(s + ".") for s in b.skipped):
                    continue
                self.fail(f"`{full}` ({type(module).__name__}, {list(p.shape)}) in {self.where} is neither a "
                          f"target nor skipped", kind, notes=[f"give `{mname}` a stage (`:N`) or mark it `:!`"])
        return b

    def resolve(self, m: ir.Module, parent: nn.Module, prefix: str) -> tuple[str | None, Any]:
        for alt in m.names:
            obj = get_path(parent, alt)
            if obj is not None:
                return alt, obj
        if m.optional:
            return None, None
        alt = m.names[0]
        head, _, last = alt.rpartition(".")
        container = get_path(parent, head) if head else parent
        siblings = _children_names(container)
        where = ir.join_path(prefix, alt)
        self.fail(f"`{where}` does not exist in {self.where}", m,
                  suggestion=nearest(last, siblings), notes=[f"siblings: {' '.join(siblings) or '(none)'}"])
        return None, None

    def walk(self, items: tuple, parent: nn.Module, prefix: str, b: _LayerBinding, shared: bool,
             moe_path: str | None, num_experts: int | None) -> None:
        for it in items:
            if not isinstance(it, ir.Module):
                continue  # expert-only items are handled by `experts`
            name, obj = self.resolve(it, parent, prefix)
            if name is None:
                continue
            path = ir.join_path(prefix, name)
            if it.skip or it.role == "router":
                b.skipped.append(path)
                self.cover(obj, path, b)
                continue
            if it.role == "moe":
                if not isinstance(obj, nn.Module):
                    self.fail(f"`{path}:moe` is not a module", it)
                    continue
                self.walk(it.children or (), obj, path, b, shared, path, num_experts)
                self.moe_block(it, obj, path, b, num_experts)
                continue
            if it.role == "experts":
                continue  # bound by moe_block, which needs the router and shared experts first
            if it.stage is not None and it.grouped:
                self.grouped_target(it, obj, path, b)
            elif it.stage is not None:
                self.target(it, obj, path, b, shared)
            if it.children is not None:
                if not isinstance(obj, nn.Module):
                    self.fail(f"`{path}` is a tensor; it cannot have children", it)
                    continue
                self.walk(it.children, obj, path, b, shared or it.role == "moe-share", moe_path, num_experts)

    def cover(self, obj: Any, path: str, b: _LayerBinding) -> None:
        if isinstance(obj, nn.Module):
            for pname, _ in obj.named_parameters():
                b.covered.add(ir.join_path(path, pname))
        else:
            b.covered.add(path)

    def target(self, it: ir.Module, obj: Any, path: str, b: _LayerBinding, shared: bool) -> None:
        if not isinstance(obj, nn.Linear):
            what = type(obj).__name__ if isinstance(obj, nn.Module) else f"tensor {list(obj.shape)}"
            weight = get_path(obj, "weight") if isinstance(obj, nn.Module) else None
            grouped = isinstance(weight, torch.Tensor) and weight.dim() == 3
            self.fail(f"`{path}:{it.stage}` is a {what}, not an nn.Linear: only Linear weights take a stage", it,
                      notes=["mark it `:!` to run it without quantizing"]
                      + ([f"a container of E Linears in one [E, out, in] `weight`, called as `(rows, sizes)`, is "
                          f"`{'|'.join(it.names)}:{it.stage}:grouped`"] if grouped else []))
            return
        ckpt = it.ckpt if it.ckpt is not None else path
        b.linears.append(BoundLinear(path=path, stage=it.stage, in_features=obj.in_features,
                                     out_features=obj.out_features, bias=obj.bias is not None, ckpt=ckpt,
                                     shared_expert=shared))
        self.cover(obj, path, b)

    def grouped_target(self, it: ir.Module, obj: Any, path: str, b: _LayerBinding) -> None:
        weight = get_path(obj, "weight") if isinstance(obj, nn.Module) else None
        others = [n for n, _ in obj.named_parameters() if n != "weight"] if isinstance(obj, nn.Module) else []
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or others:
            what = type(obj).__name__ if isinstance(obj, nn.Module) else f"tensor {list(obj.shape)}"
            have = f"parameters {' '.join(n for n, _ in obj.named_parameters())}" if isinstance(obj, nn.Module) else ""
            self.fail(f"`{path}:{it.stage}:grouped` is a {what}: a grouped container holds exactly one [E, out, in] "
                      f"parameter `weight`" + (f" (it has {have})" if have else ""), it)
            return
        E, out_f, in_f = weight.shape
        ckpt = it.ckpt if it.ckpt is not None else path
        b.grouped.append(BoundGrouped(path=path, stage=it.stage, experts=E, in_features=in_f, out_features=out_f,
                                      ckpt=ckpt, module_class=type(obj).__name__))
        self.cover(obj, path, b)

    # -- MoE blocks --------------------------------------------------------------------------

    def moe_block(self, it: ir.Module, block: nn.Module, path: str, b: _LayerBinding, num_experts: int | None) -> None:
        router, shared, experts_item, experts_name = None, [], None, None
        for sub, subpath in _roles(it.children or (), ""):
            name = next((n for n in sub.names if get_path(block, ir.join_path(subpath, n)) is not None), None)
            if name is None:
                continue
            full = ir.join_path(path, ir.join_path(subpath, name))
            if sub.role == "router":
                router = full
            elif sub.role == "moe-share":
                shared.append(full)
            elif sub.role == "experts":
                experts_item, experts_name = sub, ir.join_path(subpath, name)
        inline = experts_item is None and any(isinstance(c, ir.CallSig) for c in it.children or ())
        if experts_item is None and not inline:
            return  # `walk` has already reported the experts path that does not resolve (or it is optional)
        if num_experts is None:
            self.fail("the experts count did not evaluate", it)
            return
        if inline:  # grouped containers of the block itself (`call(rows, sizes)`)
            experts = self.experts(it, block, path, b, num_experts)
        else:
            experts = self.experts(experts_item, get_path(block, experts_name), ir.join_path(path, experts_name), b,
                                   num_experts)
        if experts is not None:
            b.moe.append(BoundMoe(path=path, router=router, shared=tuple(shared), experts=experts,
                                  module_class=type(block).__name__))

    def experts(self, it: ir.Module, mod: nn.Module, path: str, b: _LayerBinding, E: int) -> BoundExperts | None:
        kids = it.children or ()
        fn = next(c for c in kids if isinstance(c, ir.ExpertFn))
        scale = next((c.where for c in kids if isinstance(c, ir.Scale)), "output")
        call = next((c.args for c in kids if isinstance(c, ir.CallSig)), ("hidden", "index", "weights"))
        ckpts = [c for c in kids if isinstance(c, ir.Ckpt)]
        ckpt_fused = any(c.fused for c in ckpts)
        slots = self.extra_slots(kids)
        if slots is None:
            return None
        dims: dict[str, tuple[int, int]] = {}
        tensors: list[BoundTensor] = []
        module_list: list[BoundLinear] = []
        errors_before = len(self.errors)
        for t in (c for c in kids if isinstance(c, ir.FusedTensor)):
            p = get_path(mod, t.name)
            owner = get_path(mod, t.name.rpartition(".")[0]) if "." in t.name else None
            if call == ir.GROUPED_CALL and isinstance(p, torch.Tensor) and not isinstance(owner, nn.Module):
                self.fail(f"`{path}.{t.name}`: with `call(rows, sizes)` a tensor belongs to a grouped container "
                          f"module inside {type(mod).__name__}", t)
                continue
            if not isinstance(p, torch.Tensor):
                siblings = [n for n, _ in mod.named_parameters()]
                self.fail(f"`{path}.{t.name}` is not a parameter of {type(mod).__name__} in {self.where}", t,
                          suggestion=nearest(t.name, siblings), notes=[f"parameters: {' '.join(siblings)}"])
                continue
            try:
                stored, out_f, in_f = fused.shape_of(tuple(p.shape), t.layout, t.split, E, extra=len(slots))
            except MoedslError as err:
                self.fail(f"`{path}.{t.name}` {list(p.shape)}: {err.message}", t)
                continue
            if t.bias is not None:
                bias = get_path(mod, t.bias)
                if not isinstance(bias, torch.Tensor):
                    self.fail(f"bias `{path}.{t.bias}` does not exist in {self.where}", t,
                              suggestion=nearest(t.bias, [n for n, _ in mod.named_parameters()]))
                    continue
                total = out_f * len(t.roles)
                if tuple(bias.shape) != (stored, total):
                    self.fail(f"bias `{t.bias}` is {list(bias.shape)}, expected [{stored}, {total}]", t)
                b.covered.add(ir.join_path(path, t.bias))
            b.covered.add(ir.join_path(path, t.name))
            for r in t.roles:
                dims[r] = (out_f, in_f)
            tensors.append(BoundTensor(name=t.name, layout=t.layout, split=t.split, roles=t.roles, stage=t.stage,
                                       skip=t.skip, bias=t.bias, ckpt=t.ckpt, shape=tuple(p.shape), out_features=out_f,
                                       in_features=in_f, stored_experts=stored))
        each = next((c for c in kids if isinstance(c, ir.Each)), None)
        if each is not None:
            if not isinstance(mod, nn.ModuleList) or len(mod) != E:
                self.fail(f"`{path}` with `#` must be a ModuleList of {E} experts, it is {type(mod).__name__}", it)
                return None
            for e in range(E):
                sub = _LayerBinding()
                self.walk(each.children, mod[e], f"{path}.{e}", sub, shared=False, moe_path=None, num_experts=E)
                b.covered |= sub.covered
                b.skipped += sub.skipped
                for lin in sub.linears:
                    role = _proj_of(each.children, lin.path.split(".", 1 + path.count(".") + 1)[-1])
                    lin = lin.model_copy(update={"expert": e, "proj": role})
                    if e == 0:
                        module_list.append(lin)
                    if role:
                        dims[role] = (lin.out_features, lin.in_features)
        if len(self.errors) > errors_before:
            return None
        hidden_size = dims["down"][0]
        inter = dims["down"][1]
        for r in ("gate", "up"):
            if r in dims and dims[r] != (inter, hidden_size):
                self.fail(f"`{r}` of `{path}` is [out={dims[r][0]}, in={dims[r][1]}] but `down` is "
                          f"[out={hidden_size}, in={inter}]: is the layout transposed?", it,
                          notes=["[E,out,in] is nn.Linear's orientation; [E,in,out] is transposed"])
                return None
        ckpt: dict[str, str] = {}
        for role in ("gate", "up", "down"):
            if role not in dims:
                continue
            given = next((c.template for c in ckpts if c.role == role), None)
            if given is not None:
                ckpt[role] = given
            elif module_list:
                lin = next(l for l in module_list if l.proj == role)
                ckpt[role] = lin.ckpt.replace(f"{path}.0.", f"{path}.{{e}}.", 1)
            elif call == ir.GROUPED_CALL:  # one module per expert under its container: `mlp.input_linear.{e}.gate_proj`
                owner = next(t.name.rpartition(".")[0] for t in tensors if role in t.roles)
                ckpt[role] = f"{path}.{owner}.{{e}}.{role}_proj"
            else:
                ckpt[role] = f"{path}.{{e}}.{role}_proj"
        return BoundExperts(path=path, num_experts=E, hidden_size=hidden_size, intermediate_size=inter, fn=fn,
                            scale=scale, call=call, tensors=tuple(tensors), module_list=tuple(module_list),
                            ckpt=ckpt, ckpt_fused=ckpt_fused, module_class=type(mod).__name__, slots=slots)

    def extra_slots(self, kids: tuple) -> tuple[str, ...] | None:
        """`extra identity(N)` / `extra zero(N)`: one entry per weightless router slot after the E experts."""
        slots: list[str] = []
        for c in kids:
            if not isinstance(c, ir.ExtraSlots):
                continue
            try:
                n = evaluate(c.count, self.env)
            except MoedslError as err:
                err.message = f"`extra {c.what}(...)`: {err.message}"
                err.code = "bind error"
                self.errors.append(err)
                return None
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                self.fail(f"`extra {c.what}(...)` must be a non-negative integer; for {self.model_class} it is {n!r}",
                          c.count)
                return None
            slots += [c.what] * n
        return tuple(slots)


def _common_parts(a: list[str], b: list[str]) -> int:
    """How many leading path components two dotted paths share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _has_moe(items: tuple) -> bool:
    return any(isinstance(it, ir.Module) and it.role == "moe" for it in ir.walk_items(items))


def _roles(items: tuple, prefix: str):
    """(module item, its parent path inside the block) for role-bearing modules, not entering `:experts`."""
    for it in items:
        if isinstance(it, ir.Module):
            if it.role in ("router", "moe-share", "experts"):
                yield it, prefix
            if it.children and it.role not in ("experts", "moe-share"):
                yield from _roles(it.children, ir.join_path(prefix, it.names[0]))


def _proj_of(items: tuple, rel: str) -> str | None:
    for it in items:
        if isinstance(it, ir.Module):
            for n in it.names:
                if rel == n:
                    return it.proj
                if it.children and rel.startswith(n + "."):
                    return _proj_of(it.children, rel[len(n) + 1:])
    return None


def bind(d: ir.Definition, model: nn.Module) -> BoundDefinition:
    """Bind a resolved definition to a model (meta or real). Raises MoedslError(s) on any problem."""
    return Binder(d, model).bind()
