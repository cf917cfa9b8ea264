"""`.moedef` text → `Definition` IR.

Lark parses the text (grammars/moedef.lark, LALR, so errors come with the set of tokens that
would have been accepted); a top-down walk over the parse tree builds the IR in source order,
which lets each item take the `//` comments written above it. Every error is a `MoedslError`
with file:line:col; nothing else escapes `parse()`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from moedsl.errors import MoedslError, Span, nearest
from moedsl.lang import ir
from moedsl.lang.ckpt_name import template_problem

# moedsl/grammars is a link to the checkout's top-level grammars/ and a real folder in the wheel
GRAMMAR_PATH = (Path(__file__).resolve().parents[1] / "grammars" / "moedef.lark").resolve()
MAX_NESTING = 64  # brackets deeper than this are refused before parsing (no stack exhaustion)
MAX_EXPR_DEPTH = 100  # expression trees deeper than this are refused (`not not ...`, `a.b.c...`, `1 + 1 + ...`)
MAX_NUMBER_DIGITS = 400  # longer number literals are refused (Python refuses int() of > 4300 digits)

KEYWORDS = ("arch", "extends", "match", "carry", "experts", "top_k", "layers", "embed", "final_norm", "lm_head",
            "language_model", "text_config", "towers", "let", "fragment", "layer", "when", "otherwise", "use", "tensor", "bias", "fn", "scale",
            "call", "ckpt", "extra", "fused", "as", "and", "or", "not", "in", "true", "false", "none")
FUNCTIONS = ("len", "min", "max", "abs", "floordiv", "range", "int", "float", "bool", "str")
FN_FORMS = ("glu", "mlp", "swiglu_clamped")
# words that start a statement or an item: a near miss of one of these at the start of a line that fails to
# parse is reported as a misspelt keyword (`tensr w [E,out,in] ...` -> did you mean `tensor`?)
STATEMENT_WORDS = ("arch", "extends", "match", "experts", "top_k", "layers", "embed", "final_norm", "lm_head",
                   "language_model", "text_config", "towers", "let", "fragment", "layer", "use", "tensor", "fn",
                   "scale", "call", "ckpt", "extra")
ANNOTATIONS = (":0", ":1", ":!", ":?") + tuple(":" + r for r in ir.ROLES) + (":grouped",)

_TERMINAL_WORDS = {
    "NAME": "a name", "STRING": "a string", "INT": "an integer", "FLOAT": "a number",
    "ANNOT": "an annotation (:0, :!, :?, :moe, ...)", "CMP_OP": "a comparison", "ADD_OP": "+ or -",
    "MUL_OP": "*, / or %", "SIGN": "-", "$END": "end of file",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The parser. Analysing the grammar (LALR tables, one lexer per parser state) takes most of a second,
    so lark keeps the result in moedsl's cache directory and loads it from there while the file's hash of
    the grammar, the options and lark's and Python's versions still match (it rebuilds, and rewrites the
    file, on any mismatch or damage); an unwritable cache only means a rebuild every time."""
    import logging

    import lark

    text = GRAMMAR_PATH.read_text()
    options = dict(parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True,
                   lexer_callbacks={"COMMENT": _collect_comment})
    cache = _grammar_cache(text)
    if cache is None:
        return Lark(text, **options)
    level = lark.logger.level
    lark.logger.setLevel(logging.CRITICAL)  # a damaged or unwritable cache file is no news to the user
    try:
        return Lark(text, cache=cache, **options)
    finally:
        lark.logger.setLevel(level)


def _grammar_cache(text: str) -> str | None:
    """The file lark keeps the analysed grammar in (one per grammar text), in a directory of the user's own;
    None when that cannot be created or written."""
    import hashlib
    import os

    from moedsl.cache import cache_root

    directory = cache_root() / "grammar"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return None
    return str(directory / f"moedef-{hashlib.sha256(text.encode()).hexdigest()[:16]}.lark")


_comment_sink = threading.local()


def _collect_comment(token: Token) -> Token:
    sink = getattr(_comment_sink, "tokens", None)
    if sink is not None:
        sink.append(token)
    return token


def _describe_terminals(names: set[str] | frozenset[str]) -> list[str]:
    lark = _lark()
    by_name = {t.name: t for t in lark.terminals}
    out = []
    for n in sorted(names):
        if n in _TERMINAL_WORDS:
            out.append(_TERMINAL_WORDS[n])
        elif n in by_name and by_name[n].pattern.type == "str":
            out.append(f"`{by_name[n].pattern.value}`")
        else:
            out.append(n)
    return sorted(set(out))


class _Builder:
    """Walks the Lark tree top-down, building IR nodes and attaching comments."""

    def __init__(self, text: str, file: str, comments: list[Token]):
        self.text = text
        self.file = file
        self.comments = sorted(comments, key=lambda t: t.start_pos)
        self.next_comment = 0
        self.next_item_line: int | None = None

    # -- positions and errors --------------------------------------------------------------

    def span(self, node: Tree | Token) -> Span:
        if isinstance(node, Token):
            return Span(self.file, node.line, node.column, max(1, len(str(node))), self.text)
        meta = node.meta
        if getattr(meta, "empty", True):
            return Span(self.file, 1, 1, 1, self.text)
        length = meta.end_pos - meta.start_pos if meta.end_line == meta.line else 1
        return Span(self.file, meta.line, meta.column, max(1, length), self.text)

    def error(self, message: str, at: Tree | Token, **kw) -> MoedslError:
        return MoedslError(message, span=self.span(at), **kw)

    # -- comments --------------------------------------------------------------------------

    def docs_before(self, pos: int) -> tuple[str, ...]:
        out = []
        while self.next_comment < len(self.comments) and self.comments[self.next_comment].start_pos < pos:
            out.append(str(self.comments[self.next_comment])[2:].rstrip())
            self.next_comment += 1
        return tuple(out)

    def docs_same_line(self, line: int, pos: int) -> tuple[str, ...]:
        out = []
        while (self.next_comment < len(self.comments) and self.comments[self.next_comment].line == line
               and self.comments[self.next_comment].start_pos >= pos):
            out.append(str(self.comments[self.next_comment])[2:].rstrip())
            self.next_comment += 1
        return tuple(out)

    def docs_for(self, node: Tree) -> tuple[str, ...]:
        return self.docs_before(node.meta.start_pos)

    # -- top level -------------------------------------------------------------------------

    def definition(self, tree: Tree) -> ir.Definition:
        header: dict = {}
        header_spans: dict = {}
        header_doc: list[str] = []
        lets, fragments, layers = [], [], []
        for stmt in tree.children:
            doc = self.docs_for(stmt)
            kind = stmt.data
            if kind in ("let_stmt", "fragment_stmt", "layer_stmt"):
                if kind == "let_stmt":
                    name, value = stmt.children
                    if str(name) in KEYWORDS or str(name) in ("i", "config"):
                        raise self.error(f"`{name}` is reserved and cannot be a let name", name)
                    lets.append(ir.Let(name=str(name), value=self.expr(value), doc=doc, span=self.span(stmt)))
                elif kind == "fragment_stmt":
                    name, block = stmt.children
                    fragments.append(ir.Fragment(name=str(name), items=self.block(block), doc=doc, span=self.span(stmt)))
                else:
                    name, when, block = stmt.children
                    cond = self.expr(when.children[0]) if when.data == "when_expr" else None
                    layers.append(ir.LayerKind(name=str(name), when=cond, items=self.block(block), doc=doc, span=self.span(stmt)))
                continue
            field, value = self.header_stmt(stmt)
            if field in header:
                first = header_spans[field]
                raise self.error(f"`{_HEADER_WORD[field]}` is given twice (first at line {first.line})", stmt)
            header[field] = value
            if stmt.data == "layers_stmt" and len(stmt.children) > 1:  # `layers PATHS @ "ckpt"`
                tok = stmt.children[1].children[0]
                root = self.string(tok)
                if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", root):
                    raise self.error(f"the checkpoint root {json.dumps(root)} is not a dotted path", tok,
                                     notes=['e.g. `layers model.layers @ "backbone.layers"`'])
                header["layers_ckpt"] = root
            header_spans[field] = self.span(stmt)
            header_doc.extend(doc)
        trailing = self.docs_before(len(self.text) + 1)
        if "name" not in header:
            raise MoedslError("a definition must start with `arch NAME`", span=Span(self.file, 1, 1, 1, self.text),
                              expected=["`arch`"])
        self._check_unique([l.name for l in lets], lets, "let")
        self._check_unique([f.name for f in fragments], fragments, "fragment")
        self._check_unique([k.name for k in layers], layers, "layer kind")
        otherwise = [k for k in layers if k.when is None]
        if len(otherwise) > 1:
            raise MoedslError("only one layer kind may be `otherwise`", span=otherwise[1].span)
        if otherwise and layers[-1].when is not None:
            raise MoedslError(f"layer kind `{otherwise[0].name}` is `otherwise`, so it must come last",
                              span=otherwise[0].span)
        head = ir.Header(**header, doc=tuple(header_doc), span=header_spans.get("name"), spans=header_spans)
        return ir.Definition(header=head, lets=tuple(lets), fragments=tuple(fragments), layers=tuple(layers),
                             trailing_doc=trailing, source_file=self.file)

    def _check_unique(self, names: list[str], nodes: list, what: str) -> None:
        seen: set[str] = set()
        for name, node in zip(names, nodes):
            if name in seen:
                raise MoedslError(f"{what} `{name}` is defined twice", span=node.span)
            seen.add(name)

    def header_stmt(self, stmt: Tree) -> tuple[str, object]:
        kind, kids = stmt.data, stmt.children
        if kind == "arch_stmt":
            return "name", str(kids[0])
        if kind == "extends_stmt":
            return "extends", str(kids[0])
        if kind == "match_stmt":
            return "matches", tuple(self.string(k) for k in kids)
        if kind == "experts_stmt":
            return "experts", self.expr(kids[0])
        if kind == "top_k_stmt":
            return "top_k", self.expr(kids[0])
        if kind == "carry_stmt":
            names = [str(k) for k in kids]
            if len(set(names)) != len(names):
                raise self.error("`carry` names an argument twice", stmt)
            return "carry", tuple(names)
        if kind == "text_config_stmt":
            return "text_config", self.expr(kids[0])
        if kind == "towers_stmt":
            return "towers", self.towers(kids)
        field = {"layers_stmt": "layers", "embed_stmt": "embed", "norm_stmt": "final_norm", "head_stmt": "lm_head",
                 "language_model_stmt": "language_model"}[kind]
        return field, self.paths(kids[0])

    def towers(self, kids: list) -> tuple[ir.Tower, ...]:
        out: list[ir.Tower] = []
        for tower in kids:
            paths, annot = tower.children
            if annot is not None and str(annot) != ":?":
                raise self.error(f"a tower takes only `:?` (optional), not `{annot}`", annot, expected=[":?"])
            names = self.paths(paths)
            if any(t.names == names for t in out):
                raise self.error(f"tower `{'|'.join(names)}` is named twice", tower)
            out.append(ir.Tower(names=names, optional=annot is not None, span=self.span(tower)))
        return tuple(out)

    # -- module tree -------------------------------------------------------------------------

    def block(self, block: Tree) -> tuple:
        items = []
        kids = block.children
        for n, child in enumerate(kids):
            # a `// comment` after the last item on a line belongs to that item
            self.next_item_line = kids[n + 1].meta.line if n + 1 < len(kids) else None
            items.append(self.item(child))
        return tuple(items)

    def item(self, node: Tree):
        doc = self.docs_for(node)
        build = getattr(self, "item_" + node.data)
        return build(node, doc)

    def _trailing(self, node: Tree, doc: tuple[str, ...]) -> tuple[str, ...]:
        if self.next_item_line == node.meta.end_line:
            return doc
        return doc + self.docs_same_line(node.meta.end_line, node.meta.end_pos)

    def item_module(self, node: Tree, doc):
        paths, *rest = node.children
        fields: dict = {"names": self.paths(paths)}
        children = None
        for part in rest:
            if part is None:
                continue
            if isinstance(part, Token) and part.type == "ANNOT":
                self.annotation(part, fields, allow_roles=True)
            elif part.data == "ckpt_name":
                fields["ckpt"] = self.string(part.children[0])
            elif part.data == "role_as":
                role = str(part.children[0])
                if role not in ir.PROJ_ROLES:
                    raise self.error(f"unknown projection role `{role}`", part.children[0], expected=list(ir.PROJ_ROLES),
                                     suggestion=nearest(role, ir.PROJ_ROLES))
                fields["proj"] = role
            elif part.data == "block":
                children = part
        if children is None:
            return ir.Module(**fields, doc=self._trailing(node, doc), span=self.span(node))
        return ir.Module(**fields, children=self.block(children), doc=doc, span=self.span(node))

    def annotation(self, tok: Token, fields: dict, allow_roles: bool) -> None:
        word = str(tok)[1:]
        if word.isdigit():
            key, value = "stage", (int(word) if len(word) <= 6 else 10_001)
            if value > 10_000:
                raise self.error(f"stage {word} is too large", tok)
        elif word == "!":
            key, value = "skip", True
        elif word == "?":
            key, value = "optional", True
        elif word in ir.ROLES and allow_roles:
            key, value = "role", word
        elif word == "grouped" and allow_roles:
            key, value = "grouped", True
        else:
            allowed = ANNOTATIONS if allow_roles else (":0", ":1", ":!")
            hint = nearest(str(tok), allowed, cutoff=0.5)
            raise self.error(f"unknown annotation `{tok}`", tok, expected=list(allowed) , suggestion=hint)
        if key in fields:
            raise self.error(f"annotation `{tok}` repeats or contradicts an earlier one ({key})", tok)
        fields[key] = value

    def item_use_item(self, node: Tree, doc):
        return ir.Use(fragment=str(node.children[0]), doc=self._trailing(node, doc), span=self.span(node))

    def item_each_item(self, node: Tree, doc):
        return ir.Each(children=self.block(node.children[0]), doc=doc, span=self.span(node))

    def item_tensor_item(self, node: Tree, doc):
        name, layout, split, *rest = node.children
        dims = []
        for dim in layout.children:
            dims.append("*".join(str(t) for t in dim.children if t is not None))
        orientation = ",".join(dims)
        if orientation not in ir.ORIENTATIONS:
            raise self.error(f"unknown tensor layout `[{orientation}]`", layout,
                             expected=[f"[{o}]" for o in ir.ORIENTATIONS],
                             suggestion=(lambda n: f"[{n}]" if n else None)(nearest(orientation, ir.ORIENTATIONS, 0.4)))
        if split.data == "split_pair":
            how, a, b = split.children
            if str(how) not in ("concat", "interleave"):
                raise self.error(f"unknown split `{how}`", how, expected=["concat(gate, up)", "interleave(gate, up)"],
                                 suggestion=nearest(str(how), ("concat", "interleave")))
            roles = (self.proj_role(a), self.proj_role(b))
            if roles[0] == roles[1]:
                raise self.error(f"a split names `{roles[0]}` twice", split)
            kind = str(how)
        else:
            roles, kind = (self.proj_role(split.children[0]),), "one"
        fields: dict = {}
        bias = ckpt = None
        for part in rest:
            if isinstance(part, Token):
                self.annotation(part, fields, allow_roles=False)
            elif part is not None and part.data == "ckpt_name":
                ckpt = self.string(part.children[0])
            elif part is not None:
                bias = self.dotted(part.children[0])
        if "optional" in fields:
            raise self.error("a fused tensor cannot be optional", node)
        return ir.FusedTensor(name=self.dotted(name), layout=orientation, split=kind, roles=roles, bias=bias, ckpt=ckpt,
                              doc=self._trailing(node, doc), span=self.span(node), **fields)

    def proj_role(self, tok: Token) -> str:
        role = str(tok)
        if role not in ir.PROJ_ROLES:
            raise self.error(f"unknown projection role `{role}`", tok, expected=list(ir.PROJ_ROLES),
                             suggestion=nearest(role, ir.PROJ_ROLES))
        return role

    def item_fn_item(self, node: Tree, doc):
        form, *args = node.children
        args = [a for a in args if a is not None]
        if str(form) not in FN_FORMS:
            raise self.error(f"unknown expert function `{form}`", form, expected=list(FN_FORMS),
                             suggestion=nearest(str(form), FN_FORMS))
        pos = [a for a in args if a.data == "fn_posarg"]
        kw: dict = {}
        for a in args:
            if a.data == "fn_kwarg":
                if str(a.children[0]) in kw:
                    raise self.error(f"`{a.children[0]}` is given twice", a.children[0])
                kw[str(a.children[0])] = (a, a.children[1])
        fields: dict = {"form": str(form)}
        if str(form) in ("glu", "mlp"):
            if len(pos) != 1 or kw:
                raise self.error(f"`fn {form}` takes one activation, e.g. `fn {form}(silu)`", node)
            act = str(pos[0].children[0])
            acts = ir.ACTIVATIONS + ("sigmoid",)
            if act not in acts:
                raise self.error(f"unknown activation `{act}`", pos[0], expected=list(acts), suggestion=nearest(act, acts))
            fields["act"] = act
        else:
            if pos or set(kw) != {"alpha", "limit"}:
                raise self.error("`fn swiglu_clamped` takes `alpha=` and `limit=`, e.g. "
                                 "`fn swiglu_clamped(alpha=1.702, limit=7.0)`", node)
            for key, (arg, value) in kw.items():
                number = self.number(value)
                if number is None:
                    raise self.error(f"`{key}` must be a number", arg)
                fields[key] = float(number)
        return ir.ExpertFn(**fields, doc=self._trailing(node, doc), span=self.span(node))

    def number(self, value) -> float | int | None:
        if isinstance(value, Tree) and value.data == "signed_number":
            sign = -1 if len(value.children) == 2 else 1
            tok = value.children[-1]
            return sign * self.number_token(tok)
        return None

    def number_token(self, tok: Token) -> int | float:
        """The value of an INT or FLOAT token; too long or too large a number is a located error."""
        if len(tok) > MAX_NUMBER_DIGITS:
            raise self.error(f"number literal is too long ({len(tok)} characters)", tok)
        if tok.type == "INT":
            return int(tok)
        value = float(tok)
        if not math.isfinite(value):
            raise self.error(f"number `{tok}` is too large", tok)
        return value

    def item_scale_item(self, node: Tree, doc):
        where = str(node.children[0])
        if where not in ("output", "input"):
            raise self.error(f"`scale` is `output` or `input`, not `{where}`", node.children[0],
                             expected=["output", "input"], suggestion=nearest(where, ("output", "input")))
        return ir.Scale(where=where, doc=self._trailing(node, doc), span=self.span(node))

    def item_call_item(self, node: Tree, doc):
        args = []
        for tok in node.children:
            if str(tok) not in ir.CALL_ARGS:
                raise self.error(f"unknown call argument `{tok}`", tok, expected=list(ir.CALL_ARGS),
                                 suggestion=nearest(str(tok), ir.CALL_ARGS))
            if str(tok) in args and str(tok) != "_":
                raise self.error(f"`call(...)` names `{tok}` twice", tok)
            args.append(str(tok))
        if any(a in ir.GROUPED_CALL for a in args):
            if tuple(args) != ir.GROUPED_CALL:
                raise self.error("grouped experts are called as `call(rows, sizes)`, with nothing else", node)
        elif "hidden" not in args:
            raise self.error("`call(...)` must name the `hidden` argument", node)
        return ir.CallSig(args=tuple(args), doc=self._trailing(node, doc), span=self.span(node))

    def item_ckpt_role(self, node: Tree, doc):
        role_tok, template_tok = node.children
        role = self.proj_role(role_tok)
        template = self.string(template_tok)
        problem = template_problem(template)
        if problem is not None:
            # point at the brace: offsets in the raw token (after its quote) match unless escapes precede it
            raw = template_problem(str(template_tok)[1:-1])
            offset, length, why = raw if raw is not None else (-1, 1, problem[2])
            span = self.span(template_tok)
            raise MoedslError(f"checkpoint name {json.dumps(template)[:80]}: {why}",
                              span=Span(span.file, span.line, span.col + 1 + offset, length, self.text),
                              expected=["{e}"])
        if "{e}" not in template:
            raise self.error("a per-expert checkpoint name needs `{e}` (the expert index)", template_tok)
        return ir.Ckpt(role=role, template=template, doc=self._trailing(node, doc), span=self.span(node))

    def item_extra_item(self, node: Tree, doc):
        what, count = node.children
        if str(what) not in ("identity", "zero"):
            raise self.error(f"unknown extra slot `{what}`", what, expected=["identity(N)", "zero(N)"],
                             suggestion=nearest(str(what), ("identity", "zero")))
        return ir.ExtraSlots(what=str(what), count=self.expr(count), doc=self._trailing(node, doc), span=self.span(node))

    def item_ckpt_fused(self, node: Tree, doc):
        return ir.Ckpt(fused=True, doc=self._trailing(node, doc), span=self.span(node))

    # -- leaves ------------------------------------------------------------------------------

    def paths(self, node: Tree) -> tuple[str, ...]:
        return tuple(self.dotted(d) for d in node.children)

    def dotted(self, node: Tree) -> str:
        return ".".join(str(t) for t in node.children)

    def string(self, tok: Token) -> str:
        try:
            value = json.loads(str(tok))
        except json.JSONDecodeError as err:
            raise self.error(f"bad string escape: {err.msg}", tok) from None
        surrogate = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
        if surrogate is not None:
            raise self.error(f"the string holds a lone surrogate U+{ord(value[surrogate]):04X} (from a `\\u` escape), "
                             "which is not a character", tok, notes=["write the character itself, or escape a valid "
                                                                    "surrogate pair"])
        return value

    # -- expressions -------------------------------------------------------------------------

    def expr(self, node, depth: int = 0) -> ir.Expr:
        sp = self.span(node)
        if isinstance(node, Token):  # should not happen: atoms are wrapped
            raise self.error(f"unexpected `{node}`", node)
        if depth > MAX_EXPR_DEPTH:
            raise self.error(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)", node)
        kind, kids = node.data, node.children
        sub = depth + 1
        if kind == "int_lit":
            return ir.Literal_(value=self.number_token(kids[0]), span=sp)
        if kind == "float_lit":
            return ir.Literal_(value=self.number_token(kids[0]), span=sp)
        if kind == "str_lit":
            return ir.Literal_(value=self.string(kids[0]), span=sp)
        if kind in ("true_lit", "false_lit", "none_lit"):
            return ir.Literal_(value={"true_lit": True, "false_lit": False, "none_lit": None}[kind], span=sp)
        if kind == "name":
            name = str(kids[0])
            return ir.Name(id=name, span=sp)
        if kind == "list_lit":
            return ir.ListExpr(items=tuple(self.expr(k, sub) for k in kids if k is not None), span=sp)
        if kind == "attr":
            return ir.Attr(obj=self.expr(kids[0], sub), attr=str(kids[1]), span=sp)
        if kind == "index":
            return ir.Index(obj=self.expr(kids[0], sub), index=self.expr(kids[1], sub), span=sp)
        if kind == "call":
            func = str(kids[0])
            if func not in FUNCTIONS:
                raise self.error(f"unknown function `{func}`", kids[0], expected=list(FUNCTIONS),
                                 suggestion=nearest(func, FUNCTIONS))
            return ir.Call(func=func, args=tuple(self.expr(k, sub) for k in kids[1:] if k is not None), span=sp)
        if kind == "neg":
            operand = self.expr(kids[0], sub)
            if isinstance(kids[0], Tree) and kids[0].data in ("int_lit", "float_lit"):
                return ir.Literal_(value=-operand.value, span=sp)  # `-3` is a literal, as the printer writes it
            return ir.Unary(op="-", operand=operand, span=sp)
        if kind == "not_op":
            return ir.Unary(op="not", operand=self.expr(kids[0], sub), span=sp)
        if kind == "compare":
            return ir.Binary(op=str(kids[1]), left=self.expr(kids[0], sub), right=self.expr(kids[2], sub), span=sp)
        if kind == "in_op":
            return ir.Binary(op="in", left=self.expr(kids[0], sub), right=self.expr(kids[1], sub), span=sp)
        if kind == "not_in_op":
            return ir.Binary(op="not in", left=self.expr(kids[0], sub), right=self.expr(kids[1], sub), span=sp)
        if kind in ("or_expr", "and_expr", "fallback", "sum", "product"):
            # a chain `a op b op c` is a left-leaning tree: the first operand sits under every operator
            operand_nodes = kids if kind in ("or_expr", "and_expr", "fallback") else kids[0::2]
            if kind in ("or_expr", "and_expr", "fallback"):
                ops = [{"or_expr": "or", "and_expr": "and", "fallback": "??"}[kind]] * (len(kids) - 1)
            else:
                ops = [str(k) for k in kids[1::2]]
            if depth + len(ops) > MAX_EXPR_DEPTH:
                raise self.error(f"expression nested too deeply (a chain of {len(ops)} operators)", node)
            under = [len(ops)] + [len(ops) - j + 1 for j in range(1, len(operand_nodes))]  # operators above each
            operands = [self.expr(k, depth + n) for k, n in zip(operand_nodes, under)]
            return self.left_assoc(operands, ops, sp)
        raise self.error(f"unexpected expression form `{kind}`", node)

    def left_assoc(self, operands: list, ops: list[str], sp: Span) -> ir.Expr:
        out = operands[0]
        for op, right in zip(ops, operands[1:]):
            out = ir.Binary(op=op, left=out, right=right, span=sp)
        return out


_HEADER_WORD = {"language_model": "language_model", "text_config": "text_config", "towers": "towers", "carry": "carry", "name": "arch", "extends": "extends", "matches": "match", "experts": "experts", "top_k": "top_k",
                "layers": "layers", "embed": "embed", "final_norm": "final_norm", "lm_head": "lm_head"}


def _check_nesting(text: str, file: str) -> None:
    depth, line, col, in_str, in_comment, escape = 0, 1, 0, False, False, False
    prev = ""
    for ch in text:
        col += 1
        if ch == "\n":
            line, col, in_comment = line + 1, 0, False
        elif in_comment:
            pass
        elif in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "/" and prev == "/":
            in_comment = True
        elif ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                raise MoedslError(f"brackets nested more than {MAX_NESTING} deep", span=Span(file, line, col, 1, text))
        elif ch in ")]}":
            depth = max(0, depth - 1)
        prev = ch


def _end_span(text: str, file: str) -> Span:
    """The place just after the last non-blank character (lines counted by `\\n`, as Lark counts them)."""
    lines = text.rstrip().split("\n")
    return Span(file, len(lines), len(lines[-1]) + 1, 1, text)


_FIRST_WORD = re.compile(r"[ \t\r\f\v]*([A-Za-z_][A-Za-z0-9_]*)")


def _misspelt_keyword(text: str, file: str, line: int, col: int, stopped_at: str) -> MoedslError | None:
    """A line that fails to parse and starts with a near miss of a keyword: report the word, not the symptom."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    m = _FIRST_WORD.match(lines[line - 1])
    if m is None or m.end(1) >= col:  # the parser stopped at (or before) the first word itself
        return None
    word = m.group(1)
    if word in KEYWORDS:
        return None
    keyword = nearest(word, STATEMENT_WORDS, cutoff=0.75)
    if keyword is None:
        return None
    return MoedslError(f"unknown keyword `{word}`", span=Span(file, line, m.start(1) + 1, len(word), text),
                       suggestion=keyword, code="syntax error",
                       notes=[f"the line does not parse: unexpected {stopped_at} at {line}:{col}"])


def _syntax_error(err: UnexpectedInput, text: str, file: str) -> MoedslError:
    line, col = getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if 0 <= err.pos_in_stream < len(text) else "?"
        if ch == '"':
            return MoedslError("unterminated string (a string ends with `\"` on the same line)",
                               span=Span(file, line, col, 1, text), code="syntax error")
        hint = _misspelt_keyword(text, file, line, col, f"character {ch!r}")
        if hint is not None:
            return hint
        expected = _describe_terminals(err.allowed or set())
        return MoedslError(f"unexpected character {ch!r}", span=Span(file, line, col, 1, text), expected=expected,
                           code="syntax error")
    if isinstance(err, UnexpectedEOF):
        return MoedslError("unexpected end of file", span=_end_span(text, file),
                           expected=_describe_terminals(set(err.expected)), code="syntax error")
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    expected = _describe_terminals(set(err.accepts or err.expected))
    if tok.type == "$END":
        return MoedslError("unexpected end of file", span=_end_span(text, file), expected=expected,
                           code="syntax error")
    hint = _misspelt_keyword(text, file, line, col, f"`{tok}`")
    if hint is not None:
        return hint
    words = [e.strip("`") for e in expected if e.startswith("`")]
    suggestion = nearest(str(tok), words, cutoff=0.6) if tok.type == "NAME" or str(tok).isalpha() else None
    return MoedslError(f"unexpected `{tok}`", span=Span(file, line, col, max(1, len(str(tok))), text),
                       expected=expected, suggestion=suggestion, code="syntax error")


def parse(text: str, file: str = "<string>") -> ir.Definition:
    """Parse one `.moedef` text into its IR (fragments and `extends` not yet resolved)."""
    if not isinstance(text, str):
        raise MoedslError(f"expected text, got {type(text).__name__}")
    if "\x00" in text:
        pos = text.index("\x00")
        line = text.count("\n", 0, pos) + 1
        raise MoedslError("the file contains a NUL byte", span=Span(file, line, pos - text.rfind("\n", 0, pos), 1, text),
                          code="syntax error")
    _check_nesting(text, file)
    comments: list[Token] = []
    lark = _lark()
    try:
        tree = _parse_collecting(lark, text, comments)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, file) from None
    except LarkError as err:  # any other Lark failure is still our error, never a traceback
        raise MoedslError(f"could not parse: {err}", span=Span(file, 1, 1, 1, text), code="syntax error") from None
    try:
        return _Builder(text, file, comments).definition(tree)
    except VisitError as err:  # pragma: no cover - the builder does not use Lark visitors
        raise MoedslError(str(err.orig_exc), span=Span(file, 1, 1, 1, text)) from None
    except RecursionError:
        raise MoedslError("the definition is nested too deeply", span=Span(file, 1, 1, 1, text)) from None


def _parse_collecting(lark: Lark, text: str, comments: list[Token]) -> Tree:
    """Parse, collecting `//` comments (which the grammar ignores) so they can be kept as docs."""
    _comment_sink.tokens = comments
    try:
        return lark.parse(text)
    finally:
        _comment_sink.tokens = None


def parse_file(path: str | Path) -> ir.Definition:
    from moedsl.textfile import read_text

    return parse(read_text(path), str(path))
