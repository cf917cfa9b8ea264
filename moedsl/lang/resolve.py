"""Resolving a parsed definition: `extends`, `use`, and the structural rules of the tree.

`parse()` gives one file's IR exactly as written (so `fmt` can print it back). `resolve()`
follows `extends` to the parent definition, splices every `use NAME` with the fragment's
items, and checks the rules that make a tree meaningful: where roles may appear, that an
experts block declares its tensors and its function, that every target has one stage.
The result has no `extends` and no `use` left in it.
"""

from __future__ import annotations

from typing import Callable

from moedsl.errors import MoedslError, nearest
from moedsl.lang import ir

Finder = Callable[[str], ir.Definition]


def merge(child: ir.Definition, parent: ir.Definition) -> ir.Definition:
    """`child extends parent`: the child's header fields, lets, fragments and layer kinds win by name."""
    h, p = child.header, parent.header
    header = ir.Header(
        name=h.name, extends=None, matches=h.matches or p.matches,
        experts=h.experts if h.experts is not None else p.experts,
        top_k=h.top_k if h.top_k is not None else p.top_k,
        layers=h.layers or p.layers, layers_ckpt=h.layers_ckpt if h.layers else p.layers_ckpt,
        embed=h.embed or p.embed, final_norm=h.final_norm or p.final_norm,
        lm_head=h.lm_head or p.lm_head, carry=h.carry or p.carry,
        language_model=h.language_model or p.language_model,
        text_config=h.text_config if h.text_config is not None else p.text_config, towers=h.towers or p.towers,
        doc=h.doc, span=h.span, spans={**p.spans, **h.spans},
    )

    def by_name(mine: tuple, theirs: tuple) -> tuple:
        own = {x.name: x for x in mine}
        out = [own.pop(x.name, x) for x in theirs]
        return tuple(out) + tuple(x for x in mine if x.name in own)

    parent_layers = parent.layers
    if any(k.when is None for k in child.layers):  # one `otherwise` kind: the child's replaces the parent's
        mine = {k.name for k in child.layers}
        parent_layers = tuple(k for k in parent.layers if k.when is not None or k.name in mine)
    layers = list(by_name(child.layers, parent_layers))
    # an `otherwise` kind stays last whichever file it came from
    layers.sort(key=lambda k: k.when is None)
    return ir.Definition(header=header, lets=by_name(child.lets, parent.lets),
                         fragments=by_name(child.fragments, parent.fragments), layers=tuple(layers),
                         trailing_doc=child.trailing_doc, source_file=child.source_file)


def resolve(d: ir.Definition, find: Finder | None = None, _seen: tuple[str, ...] = ()) -> ir.Definition:
    """Follow `extends` (via `find`), expand `use`, and check the tree's rules."""
    if d.header.extends is not None:
        name = d.header.extends
        if name in _seen + (d.header.name,):
            chain = " → ".join(_seen + (d.header.name, name))
            raise MoedslError(f"`extends` goes round in a circle: {chain}", span=d.header.span)
        if find is None:
            raise MoedslError(f"`extends {name}`: no library to find `{name}` in", span=d.header.span)
        parent = _find_parent(d, find)
        parent = resolve_extends_only(parent, find, _seen + (d.header.name,))
        d = merge(d, parent)
    d = expand_uses(d)
    check(d)
    return d


def resolve_extends_only(d: ir.Definition, find: Finder, seen: tuple[str, ...]) -> ir.Definition:
    if d.header.extends is None:
        return d
    name = d.header.extends
    if name in seen + (d.header.name,):
        chain = " → ".join(seen + (d.header.name, name))
        raise MoedslError(f"`extends` goes round in a circle: {chain}", span=d.header.span)
    return merge(d, resolve_extends_only(_find_parent(d, find), find, seen + (d.header.name,)))


def _find_parent(d: ir.Definition, find: Finder) -> ir.Definition:
    """The definition `d` extends; a library miss is reported at `d`'s header."""
    try:
        return find(d.header.extends)  # type: ignore[arg-type]
    except MoedslError as err:
        if err.span is None:
            err.message = f"`{d.header.name} extends {d.header.extends}`: {err.message}"
            err.span = d.header.span
        raise


MAX_EXPANDED_ITEMS = 100_000  # fragments that use fragments twice over can grow exponentially


def expand_uses(d: ir.Definition) -> ir.Definition:
    frags = {f.name: f for f in d.fragments}
    budget = [MAX_EXPANDED_ITEMS]

    def expand(items: tuple, stack: tuple[str, ...]) -> tuple:
        out = []
        for it in items:
            budget[0] -= 1
            if budget[0] < 0:
                raise MoedslError(f"`use` expands to more than {MAX_EXPANDED_ITEMS} items", span=it.span)
            if isinstance(it, ir.Use):
                if it.fragment not in frags:
                    raise MoedslError(f"unknown fragment `{it.fragment}`", span=it.span, expected=sorted(frags),
                                      suggestion=nearest(it.fragment, frags))
                if it.fragment in stack:
                    raise MoedslError(f"fragment `{it.fragment}` uses itself ({' → '.join(stack + (it.fragment,))})",
                                      span=it.span)
                out.extend(expand(frags[it.fragment].items, stack + (it.fragment,)))
            elif isinstance(it, (ir.Module, ir.Each)) and it.children is not None:
                out.append(it.model_copy(update={"children": expand(it.children, stack)}))
            else:
                out.append(it)
        return tuple(out)

    fragments = tuple(f.model_copy(update={"items": expand(f.items, (f.name,))}) for f in d.fragments)
    layers = tuple(k.model_copy(update={"items": expand(k.items, ())}) for k in d.layers)
    return d.model_copy(update={"fragments": fragments, "layers": layers})


# ---- structural rules ------------------------------------------------------------------------

_EXPERT_ONLY = (ir.FusedTensor, ir.ExpertFn, ir.Scale, ir.CallSig, ir.Ckpt, ir.ExtraSlots)


def check(d: ir.Definition) -> None:
    h = d.header
    if not h.layers:
        raise MoedslError(f"`{h.name}` does not say where the decoder layers are", span=h.span,
                          notes=["add e.g. `layers model.layers`"])
    if not d.layers:
        raise MoedslError(f"`{h.name}` has no `layer` kinds", span=h.span)
    has_moe = False
    for kind in d.layers:
        has_moe |= _check_items(kind.items, moe=None, experts=None, where=f"layer {kind.name}")
    if has_moe:
        for field in ("experts", "top_k"):
            if getattr(h, field) is None:
                raise MoedslError(f"`{h.name}` has a `:moe` block but no `{field}` expression", span=h.span)
    lets = {l.name for l in d.lets}
    for e, where in _expressions(d):
        _check_names(e, lets, where)


def _expressions(d: ir.Definition):
    h = d.header
    for field in ("experts", "top_k", "text_config"):
        if getattr(h, field) is not None:
            yield getattr(h, field), "header"
    for let in d.lets:
        yield let.value, f"let {let.name}"
    for kind in d.layers:
        if kind.when is not None:
            yield kind.when, f"layer {kind.name}"
        for it in ir.walk_items(kind.items):
            if isinstance(it, ir.ExtraSlots):
                yield it.count, f"layer {kind.name}"


def _check_names(e, lets: set[str], where: str) -> None:
    if isinstance(e, ir.Name):
        if e.id not in lets and e.id not in ("i", "config"):
            names = ["i", "config", *sorted(lets)]
            raise MoedslError(f"unknown name `{e.id}` in {where}", span=e.span, expected=names,
                              suggestion=nearest(e.id, names))
        return
    for child in ("obj", "index", "operand", "left", "right"):
        sub = getattr(e, child, None)
        if sub is not None:
            _check_names(sub, lets, where)
    for sub in getattr(e, "args", ()) + getattr(e, "items", ()):
        _check_names(sub, lets, where)


def _inline_experts(m: ir.Module) -> bool:
    """A `:moe` block that holds its experts' items itself (grouped containers, `call(rows, sizes)`)."""
    return any(isinstance(c, _EXPERT_ONLY) for c in (m.children or ()))


def _check_items(items: tuple, moe: ir.Module | None, experts: ir.Module | None, where: str,
                 inline: bool = False) -> bool:
    """Checks one block (`inline`: the block of a `:moe` that holds its experts itself); returns whether a
    `:moe` block was seen."""
    seen_moe = False
    for it in items:
        if isinstance(it, _EXPERT_ONLY) and experts is None and not inline:
            word = {ir.FusedTensor: "tensor", ir.ExpertFn: "fn", ir.Scale: "scale", ir.CallSig: "call", ir.Ckpt: "ckpt",
                    ir.ExtraSlots: "extra"}[type(it)]
            raise MoedslError(f"`{word}` belongs directly inside an `:experts` module", span=it.span)
        if isinstance(it, ir.Each):
            if experts is None:
                raise MoedslError("`#` (one expert of a ModuleList) belongs inside an `:experts` module", span=it.span)
            _check_items(it.children, moe, experts, where)
            continue
        if not isinstance(it, ir.Module):
            continue
        name = "|".join(it.names)
        if it.stage is not None and it.skip:
            raise MoedslError(f"`{name}` has a stage and `:!` (never quantize): choose one", span=it.span)
        if it.stage is not None and it.children is not None:
            raise MoedslError(f"`{name}` has children: put stage numbers on the modules inside it", span=it.span)
        if it.role in ("router", "experts", "moe-share") and moe is None:
            raise MoedslError(f"`{name}:{it.role}` must be inside a `:moe` block", span=it.span)
        if it.role == "moe":
            if moe is not None:
                raise MoedslError(f"`{name}:moe` is inside another `:moe` block", span=it.span)
            seen_moe = True
            _check_moe(it)
        if it.role == "experts":
            if experts is not None:
                raise MoedslError(f"`{name}:experts` is inside another `:experts` module", span=it.span)
            _check_experts(it)
        if it.grouped:
            if it.stage is None or it.children is not None or it.role is not None or experts is not None:
                raise MoedslError(f"`{name}:grouped` is one staged module (`{name}:N:grouped`) with no children and no "
                                  "role, outside `:experts`", span=it.span)
        if it.proj is not None and experts is None:
            raise MoedslError(f"`as {it.proj}` names a role inside an expert; `{name}` is not in an `:experts` module",
                              span=it.span)
        if it.children:
            _check_items(it.children, it if it.role == "moe" else moe, it if it.role == "experts" else experts, where,
                         inline=it.role == "moe" and _inline_experts(it))
    return seen_moe


def _count_roles(items: tuple, role: str) -> list[ir.Module]:
    found = []
    for it in items:
        if isinstance(it, ir.Module):
            if it.role == role:
                found.append(it)
            if it.children and it.role not in ("moe",):
                found += _count_roles(it.children, role)
    return found


def _check_moe(m: ir.Module) -> None:
    name = "|".join(m.names)
    if m.children is None:
        raise MoedslError(f"`{name}:moe` needs a block naming its router and experts", span=m.span)
    for inner in ir.walk_items(m.children):  # before counting experts: an inner `:moe` hides its own
        if isinstance(inner, ir.Module) and inner.role == "moe":
            raise MoedslError(f"`{'|'.join(inner.names)}:moe` is inside another `:moe` block (`{name}`)",
                              span=inner.span)
    experts = _count_roles(m.children, "experts")
    if _inline_experts(m):
        if experts:
            raise MoedslError(f"`{name}:moe` holds expert items itself and has an `:experts` module: choose one",
                              span=experts[0].span)
        _check_experts(m, inline=True)
    elif len(experts) != 1:
        raise MoedslError(f"`{name}:moe` must contain exactly one `:experts` module (found {len(experts)})", span=m.span,
                          notes=["or, for experts in grouped containers of the block itself, write their `tensor`s, "
                                 "`fn` and `call(rows, sizes)` directly in the block"])
    routers = _count_roles(m.children, "router")
    if len(routers) > 1:
        raise MoedslError(f"`{name}:moe` has {len(routers)} routers", span=routers[1].span)


def _check_experts(m: ir.Module, inline: bool = False) -> None:
    name = "|".join(m.names)
    kids = m.children or ()
    what = f"`{name}:moe`" if inline else f"`{name}:experts`"
    call = next((c for c in kids if isinstance(c, ir.CallSig)), None)
    grouped = call is not None and call.args == ir.GROUPED_CALL
    if inline and not grouped:
        raise MoedslError(f"{what} holds its experts' tensors itself: they sit in grouped containers, declared with "
                          "`call(rows, sizes)`", span=(call or m).span,
                          notes=["experts in a module of their own: put the items in `NAME:experts { ... }`"])
    if grouped and not inline:
        raise MoedslError("`call(rows, sizes)` is for experts in grouped containers of the `:moe` block itself: "
                          "write the expert items directly in the `:moe` block", span=call.span)
    if grouped:
        if any(isinstance(c, ir.Each) for c in kids):
            raise MoedslError(f"{what}: grouped containers hold fused `tensor`s, not a `# {{...}}` ModuleList",
                              span=m.span)
        for c in kids:
            if isinstance(c, ir.FusedTensor) and "." not in c.name:
                raise MoedslError(f"tensor `{c.name}` of grouped experts is `CONTAINER.PARAMETER` (e.g. "
                                  "`input_linear.weight`): each container is called as `(rows, sizes)`", span=c.span)
            if isinstance(c, ir.ExtraSlots):
                raise MoedslError("`extra` slots need the chosen experts of every token: grouped containers "
                                  "(`call(rows, sizes)`) see only the rows of the experts with weights", span=c.span)
            if isinstance(c, ir.Scale) and c.where == "input":
                raise MoedslError("`scale input` with grouped containers: their rows are not scaled by the router",
                                  span=c.span)
    fns = [c for c in kids if isinstance(c, ir.ExpertFn)]
    tensors = [c for c in kids if isinstance(c, ir.FusedTensor)]
    eaches = [c for c in kids if isinstance(c, ir.Each)]
    if len(fns) != 1:
        raise MoedslError(f"{what} must declare its function once, e.g. `fn glu(silu)` (found {len(fns)})",
                          span=m.span)
    for word, cls in (("scale", ir.Scale), ("call", ir.CallSig)):
        if len([c for c in kids if isinstance(c, cls)]) > 1:
            raise MoedslError(f"{what} declares `{word}` more than once", span=m.span)
    if bool(tensors) == bool(eaches) or len(eaches) > 1:
        raise MoedslError(f"{what} must hold either fused `tensor`s or one `# {{...}}` ModuleList block",
                          span=m.span)
    roles: dict[str, object] = {}
    if tensors:
        for t in tensors:
            for r in t.roles:
                if r in roles:
                    raise MoedslError(f"role `{r}` is given by two tensors", span=t.span)
                roles[r] = t
            if t.stage is None and not t.skip:
                raise MoedslError(f"tensor `{t.name}` needs a stage (`:N`) or `:!`", span=t.span)
            if t.stage is not None and t.skip:
                raise MoedslError(f"tensor `{t.name}` has a stage and `:!` (never quantize): choose one", span=t.span)
    else:
        for leaf in _leaves(eaches[0].children):
            if leaf.proj is not None:
                if leaf.proj in roles:
                    raise MoedslError(f"role `{leaf.proj}` is given twice", span=leaf.span)
                roles[leaf.proj] = leaf
    need = {"glu": ("gate", "up", "down"), "swiglu_clamped": ("gate", "up", "down"), "mlp": ("up", "down")}[fns[0].form]
    missing = [r for r in need if r not in roles]
    extra = [r for r in roles if r not in need]
    if missing:
        raise MoedslError(f"{what} with `fn {fns[0].form}` needs a `{missing[0]}` projection", span=m.span,
                          notes=["fused: `tensor NAME [E,out,in] ROLE :N`; ModuleList: `NAME:N as ROLE`"])
    if extra:
        raise MoedslError(f"`fn {fns[0].form}` has no `{extra[0]}` projection", span=m.span)
    ckpts = [c for c in kids if isinstance(c, ir.Ckpt)]
    if any(c.fused for c in ckpts) and len(ckpts) > 1:
        raise MoedslError("`ckpt fused` cannot be combined with per-role checkpoint names", span=ckpts[0].span)
    seen: set[str] = set()
    for c in ckpts:
        if c.role in seen:
            raise MoedslError(f"checkpoint name for `{c.role}` is given twice", span=c.span)
        if c.role is not None and c.role not in roles:
            raise MoedslError(f"checkpoint name for `{c.role}`, which these experts do not have", span=c.span)
        seen.add(c.role)
    if not any(c.fused for c in ckpts):
        for t in tensors:
            if t.ckpt is not None:
                raise MoedslError(f"tensor `{t.name}` has a checkpoint key (`@ ...`): that needs `ckpt fused`",
                                  span=t.span)
    if [c for c in kids if isinstance(c, ir.ExtraSlots)] and next((c.args for c in kids if isinstance(c, ir.CallSig)),
                                                                  None) == ("hidden",):
        raise MoedslError("`extra` slots need the chosen experts: `call(hidden)` (one stacked input) has none",
                          span=m.span)
    if eaches and any(c.fused for c in ckpts):
        raise MoedslError("`ckpt fused` is for fused tensors, not a ModuleList", span=ckpts[0].span)


def _leaves(items: tuple):
    for it in items:
        if isinstance(it, ir.Module):
            if it.children is None:
                yield it
            else:
                yield from _leaves(it.children)
