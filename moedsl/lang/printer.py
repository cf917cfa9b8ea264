"""`Definition` IR → canonical `.moedef` text (what `moedsl fmt` prints).

The printer writes the fewest parentheses that keep an expression's tree, so that
parse(print(ir)) == ir for every IR, and print(parse(print(ir))) == print(ir).
"""

from __future__ import annotations

import json

from moedsl.lang import ir

INDENT = "  "

# binding strength: higher binds tighter
_PREC = {"or": 1, "and": 2, "not": 3, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "in": 4, "not in": 4,
         "+": 5, "-": 5, "*": 6, "/": 6, "%": 6, "??": 7}
_UNARY_MINUS, _POSTFIX, _ATOM = 8, 9, 10


def _literal(value) -> str:
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _prec(e: ir.Expr) -> int:
    if isinstance(e, ir.Binary):
        return _PREC[e.op]
    if isinstance(e, ir.Unary):
        return _PREC["not"] if e.op == "not" else _UNARY_MINUS
    if isinstance(e, ir.Literal_) and type(e.value) in (int, float) and (e.value < 0 or str(e.value).startswith("-")):
        return _UNARY_MINUS
    if isinstance(e, (ir.Attr, ir.Index, ir.Call)):
        return _POSTFIX
    return _ATOM


def expr(e: ir.Expr, min_prec: int = 0) -> str:
    p = _prec(e)
    if isinstance(e, ir.Literal_):
        text = _literal(e.value)
    elif isinstance(e, ir.Name):
        text = e.id
    elif isinstance(e, ir.Attr):
        obj = expr(e.obj, _POSTFIX)
        if isinstance(e.obj, ir.Literal_) and type(e.obj.value) is int:
            obj = f"({obj})"  # `1.x` would read as the number `1.` followed by `x`
        text = f"{obj}.{e.attr}"
    elif isinstance(e, ir.Index):
        text = f"{expr(e.obj, _POSTFIX)}[{expr(e.index)}]"
    elif isinstance(e, ir.Call):
        text = f"{e.func}({', '.join(expr(a) for a in e.args)})"
    elif isinstance(e, ir.ListExpr):
        text = f"[{', '.join(expr(a) for a in e.items)}]"
    elif isinstance(e, ir.Unary):
        if e.op == "not":  # `not (a in b)` reads better than `not a in b`; both parse the same
            inner = expr(e.operand, p)
            text = f"not ({inner})" if isinstance(e.operand, ir.Binary) and not inner.startswith("(") else f"not {inner}"
        else:
            text = f"-{expr(e.operand, p)}"
    elif isinstance(e, ir.Binary):
        comparison = p == 4
        left = expr(e.left, p + 1 if comparison else p)
        right = expr(e.right, p + 1)
        text = f"{left} {e.op} {right}"
    else:  # pragma: no cover
        raise TypeError(type(e))
    return f"({text})" if p < min_prec else text


def _paths(names: tuple[str, ...]) -> str:
    return "|".join(names)


def _docs(doc: tuple[str, ...], pad: str) -> list[str]:
    return [f"{pad}//{line}" for line in doc]


def _module_head(m: ir.Module) -> str:
    parts = [_paths(m.names)]
    if m.role:
        parts.append(f":{m.role}")
    if m.stage is not None:
        parts.append(f":{m.stage}")
    if m.grouped:
        parts.append(":grouped")
    if m.skip:
        parts.append(":!")
    if m.optional:
        parts.append(":?")
    head = "".join(parts)
    if m.ckpt is not None:
        head += f" @ {_literal(m.ckpt)}"
    if m.proj is not None:
        head += f" as {m.proj}"
    return head


def _tensor(t: ir.FusedTensor) -> str:
    split = f"{t.split}({', '.join(t.roles)})" if t.split != "one" else t.roles[0]
    text = f"tensor {t.name} [{t.layout}] {split}"
    if t.stage is not None:
        text += f" :{t.stage}"
    if t.skip:
        text += " :!"
    if t.bias is not None:
        text += f" bias {t.bias}"
    if t.ckpt is not None:
        text += f" @ {_literal(t.ckpt)}"
    return text


def _fn(f: ir.ExpertFn) -> str:
    if f.form == "swiglu_clamped":
        return f"fn swiglu_clamped(alpha={f.alpha!r}, limit={f.limit!r})"
    return f"fn {f.form}({f.act})"


def items(its: tuple, depth: int) -> list[str]:
    pad = INDENT * depth
    out: list[str] = []
    for it in its:
        out += _docs(it.doc, pad)
        if isinstance(it, ir.Module):
            if it.children is None:
                out.append(pad + _module_head(it))
            else:
                out += _block(pad + _module_head(it), it.children, depth)
        elif isinstance(it, ir.Each):
            out += _block(pad + "#", it.children, depth)
        elif isinstance(it, ir.Use):
            out.append(f"{pad}use {it.fragment}")
        elif isinstance(it, ir.FusedTensor):
            out.append(pad + _tensor(it))
        elif isinstance(it, ir.ExpertFn):
            out.append(pad + _fn(it))
        elif isinstance(it, ir.Scale):
            out.append(f"{pad}scale {it.where}")
        elif isinstance(it, ir.CallSig):
            out.append(f"{pad}call({', '.join(it.args)})")
        elif isinstance(it, ir.ExtraSlots):
            out.append(f"{pad}extra {it.what}({expr(it.count)})")
        elif isinstance(it, ir.Ckpt):
            out.append(f"{pad}ckpt fused" if it.fused else f"{pad}ckpt {it.role} {_literal(it.template)}")
        else:  # pragma: no cover
            raise TypeError(type(it))
    return out


def _block(head: str, children: tuple, depth: int) -> list[str]:
    if not children:
        return [head + " {}"]
    return [head + " {", *items(children, depth + 1), INDENT * depth + "}"]


def definition(d: ir.Definition) -> str:
    h = d.header
    out: list[str] = _docs(h.doc, "")
    out.append(f"arch {h.name}")
    if h.extends is not None:
        out.append(f"extends {h.extends}")
    if h.matches:
        out.append("match " + ", ".join(_literal(m) for m in h.matches))
    if h.experts is not None:
        out.append(f"experts {expr(h.experts)}")
    if h.top_k is not None:
        out.append(f"top_k {expr(h.top_k)}")
    for word, value in (("layers", h.layers), ("embed", h.embed), ("final_norm", h.final_norm), ("lm_head", h.lm_head)):
        if value is not None:
            ckpt = f" @ {_literal(h.layers_ckpt)}" if word == "layers" and h.layers_ckpt is not None else ""
            out.append(f"{word} {_paths(value)}{ckpt}")
    if h.carry:
        out.append(f"carry {', '.join(h.carry)}")
    if h.language_model is not None:
        out.append(f"language_model {_paths(h.language_model)}")
    if h.text_config is not None:
        out.append(f"text_config {expr(h.text_config)}")
    if h.towers:
        out.append("towers " + ", ".join(_paths(t.names) + (":?" if t.optional else "") for t in h.towers))
    if d.lets:
        out.append("")
    for let in d.lets:
        out += _docs(let.doc, "")
        out.append(f"let {let.name} = {expr(let.value)}")
    for frag in d.fragments:
        out.append("")
        out += _docs(frag.doc, "")
        out += _block(f"fragment {frag.name}", frag.items, 0)
    for kind in d.layers:
        out.append("")
        out += _docs(kind.doc, "")
        when = "otherwise" if kind.when is None else f"when {expr(kind.when)}"
        out += _block(f"layer {kind.name} {when}", kind.items, 0)
    if d.trailing_doc:
        out.append("")
        out += _docs(d.trailing_doc, "")
    return "\n".join(out) + "\n"
