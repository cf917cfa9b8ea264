"""parse(print(ir)) == ir, and the printer is idempotent, for random valid definitions.

The strategies below build `ir.Definition`s directly, covering every node kind. They keep to
what the language can say, and avoid exactly the corner cases the IR documents:

* unary minus applied directly to a non-negative number literal prints as a negative literal
  (`-3` reads back as `Literal_(-3)`), so `Unary("-", Literal_(n >= 0))` is not generated;
* identifiers are never keywords (`parser.KEYWORDS`);
* numbers are finite (the printer writes `repr`, and `inf` is not a literal);
* a `fn` has the arguments its form needs; a `ckpt ROLE` template contains `{e}`; split roles differ;
* `otherwise` is the last layer kind, at most one; names of lets/fragments/kinds are unique.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.lang import ir, parser, printer
from tests.long_tests import examples

REPO = Path(__file__).resolve().parents[1]
MODEL_DEFS = sorted((REPO / "model_defs").glob("*.moedef"))

# derandomized; the long run (MOEDSL_LONG_TESTS=1, tests/long_tests.py) draws four times as many
# (the health checks time generation by the wall clock: on a busy machine they fail at random)
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
SETTINGS = settings(max_examples=examples(50, 200), deadline=None, derandomize=True, suppress_health_check=SLOW_OK)

# ---- leaves ----------------------------------------------------------------------------------

_first = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_rest = _first + "0123456789"
_FAVOURITES = ["i", "config", "mlp", "experts_", "gate_proj", "up_proj", "down_proj", "w1", "model", "layers_",
               "x", "_", "E", "out", "in_", "moe_layer", "q_proj", "num_experts"]

identifiers = st.one_of(
    st.sampled_from(_FAVOURITES),
    st.builds(lambda a, b: a + b, st.sampled_from(_first), st.text(_rest, max_size=8)),
).filter(lambda s: s not in parser.KEYWORDS)

# names that the grammar reads as a NAME wherever they stand (so no keyword at all)
# a path segment may also be a number (the children of a ModuleList: `self_attn.0`)
segments = st.one_of(identifiers, identifiers, st.integers(0, 99).map(str))
dotted = st.lists(segments, min_size=1, max_size=3).map(".".join)
roots = st.lists(identifiers, min_size=1, max_size=3).map(".".join)  # `layers ... @ "backbone.layers"`
paths = st.lists(dotted, min_size=1, max_size=3).map(tuple)

# comment text: anything on one line; the parser strips trailing blanks, so none are generated
doc_line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), max_size=20) \
    .map(str.rstrip)
docs = st.lists(doc_line, max_size=2).map(tuple)

strings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ints = st.one_of(st.integers(-5, 1000), st.integers(-(10**30), 10**30))
floats = st.floats(allow_nan=False, allow_infinity=False)

# ---- expressions ------------------------------------------------------------------------------

literals = st.one_of(
    st.builds(ir.Literal_, value=ints),
    st.builds(ir.Literal_, value=floats),
    st.builds(ir.Literal_, value=strings),
    st.builds(ir.Literal_, value=st.sampled_from([True, False, None])),
)
names = st.builds(ir.Name, id=identifiers)
BINARY_OPS = ["+", "-", "*", "/", "%", "??", "==", "!=", "<", "<=", ">", ">=", "in", "not in", "and", "or"]


def _neg(operand: ir.Expr) -> ir.Expr:
    """`-x`; on a non-negative number literal that is the negative literal (the documented corner)."""
    if isinstance(operand, ir.Literal_) and type(operand.value) in (int, float) \
            and not (operand.value < 0 or math.copysign(1.0, operand.value) < 0):
        return ir.Literal_(value=-operand.value)
    return ir.Unary(op="-", operand=operand)


def _extend(children):
    return st.one_of(
        st.builds(ir.Attr, obj=children, attr=identifiers),
        st.builds(ir.Index, obj=children, index=children),
        st.builds(ir.Call, func=st.sampled_from(parser.FUNCTIONS), args=st.lists(children, max_size=3).map(tuple)),
        st.builds(ir.ListExpr, items=st.lists(children, max_size=3).map(tuple)),
        children.map(_neg),
        st.builds(ir.Unary, op=st.just("not"), operand=children),
        st.builds(ir.Binary, op=st.sampled_from(BINARY_OPS), left=children, right=children),
    )


exprs = st.recursive(st.one_of(literals, names), _extend, max_leaves=12)

# ---- module tree -------------------------------------------------------------------------------

stages = st.none() | st.integers(0, 10_000)
_braceless = strings.map(lambda s: s.replace("{", "").replace("}", ""))  # `{e}` is the only placeholder
ckpt_templates = st.builds(lambda a, b: a + "{e}" + b, _braceless, _braceless)

fused_tensors = st.builds(
    lambda name, layout, split, stage, skip, bias, ckpt, doc: ir.FusedTensor(
        name=name, layout=layout, split=split[0], roles=split[1], stage=stage, skip=skip, bias=bias, ckpt=ckpt,
        doc=doc),
    dotted, st.sampled_from(ir.ORIENTATIONS),
    st.one_of(
        st.tuples(st.sampled_from(["concat", "interleave"]),
                  st.permutations(list(ir.PROJ_ROLES)).map(lambda r: tuple(r[:2]))),
        st.tuples(st.just("one"), st.sampled_from(ir.PROJ_ROLES).map(lambda r: (r,))),
    ),
    stages, st.booleans(), st.none() | dotted, st.none() | strings, docs,
)
finite_params = st.floats(-1e6, 1e6, allow_nan=False)
expert_fns = st.one_of(
    st.builds(ir.ExpertFn, form=st.sampled_from(["glu", "mlp"]),
              act=st.sampled_from(ir.ACTIVATIONS + ("sigmoid",)), doc=docs),
    st.builds(ir.ExpertFn, form=st.just("swiglu_clamped"), alpha=finite_params, limit=finite_params, doc=docs),
)
scales = st.builds(ir.Scale, where=st.sampled_from(["output", "input"]), doc=docs)
call_sigs = st.builds(
    lambda rest, pos, doc: ir.CallSig(args=tuple(rest[:pos]) + ("hidden",) + tuple(rest[pos:]), doc=doc),
    st.lists(st.sampled_from(["index", "weights", "scores", "_"]), max_size=3, unique=True),
    st.integers(0, 3), docs,
)
ckpts = st.one_of(
    st.builds(ir.Ckpt, role=st.sampled_from(ir.PROJ_ROLES), template=ckpt_templates, doc=docs),
    st.builds(ir.Ckpt, fused=st.just(True), doc=docs),
)
extra_slots = st.builds(ir.ExtraSlots, what=st.sampled_from(["identity", "zero"]), count=exprs, doc=docs)
uses = st.builds(ir.Use, fragment=identifiers, doc=docs)
leaf_modules = st.builds(
    ir.Module, names=paths, stage=stages, skip=st.booleans(), optional=st.booleans(),
    role=st.none() | st.sampled_from(ir.ROLES), ckpt=st.none() | strings,
    proj=st.none() | st.sampled_from(ir.PROJ_ROLES), doc=docs,
)
leaf_items = st.one_of(leaf_modules, uses, fused_tensors, expert_fns, scales, call_sigs, ckpts, extra_slots)


def _nest(children):
    kids = st.lists(children, max_size=4).map(tuple)
    return st.one_of(
        st.builds(lambda m, c: m.model_copy(update={"children": c}), leaf_modules, kids),
        st.builds(ir.Each, children=kids, doc=docs),
    )


items = st.recursive(leaf_items, _nest, max_leaves=10)
item_tuples = st.lists(items, max_size=5).map(tuple)

# ---- top level ----------------------------------------------------------------------------------

lets_names = identifiers.filter(lambda s: s not in ("i", "config"))


@st.composite
def definitions(draw) -> ir.Definition:
    layers_path = draw(st.none() | paths)
    header = ir.Header(
        name=draw(identifiers),
        extends=draw(st.none() | identifiers),
        matches=tuple(draw(st.lists(strings, max_size=3))),
        experts=draw(st.none() | exprs),
        top_k=draw(st.none() | exprs),
        layers=layers_path,
        layers_ckpt=None if layers_path is None else draw(st.none() | roots),
        embed=draw(st.none() | paths),
        final_norm=draw(st.none() | paths),
        lm_head=draw(st.none() | paths),
        carry=tuple(draw(st.lists(identifiers, max_size=2, unique=True))),
        # composite models
        language_model=draw(st.none() | paths),
        text_config=draw(st.none() | exprs),
        towers=tuple(ir.Tower(names=p, optional=o)
                     for p, o in draw(st.lists(st.tuples(paths, st.booleans()), max_size=3, unique_by=lambda t: t[0]))),
        doc=draw(docs),
    )
    let_names = draw(st.lists(lets_names, max_size=3, unique=True))
    lets = tuple(ir.Let(name=n, value=draw(exprs), doc=draw(docs)) for n in let_names)
    frag_names = draw(st.lists(identifiers, max_size=3, unique=True))
    fragments = tuple(ir.Fragment(name=n, items=draw(item_tuples), doc=draw(docs)) for n in frag_names)
    kind_names = draw(st.lists(identifiers, max_size=3, unique=True))
    has_otherwise = bool(kind_names) and draw(st.booleans())
    layers = tuple(
        ir.LayerKind(name=n, when=None if (has_otherwise and k == len(kind_names) - 1) else draw(exprs),
                     items=draw(item_tuples), doc=draw(docs))
        for k, n in enumerate(kind_names)
    )
    return ir.Definition(header=header, lets=lets, fragments=fragments, layers=layers, trailing_doc=draw(docs))


# ---- properties -----------------------------------------------------------------------------------


@SETTINGS
@given(definitions())
def test_parse_print_roundtrip(d: ir.Definition) -> None:
    """parse(print(ir)) == ir, and print(parse(print(ir))) == print(ir) (the printer is idempotent)."""
    text = printer.definition(d)
    back = parser.parse(text, "roundtrip.moedef")
    assert back == d, text
    assert printer.definition(back) == text


@settings(max_examples=examples(150, 400), deadline=None, derandomize=True, suppress_health_check=SLOW_OK)
@given(exprs)
def test_expression_roundtrip(e: ir.Expr) -> None:
    text = printer.expr(e)
    d = parser.parse(f"arch a\nlet x = {text}\n")
    assert d.lets[0].value == e, text
    assert printer.expr(d.lets[0].value) == text


def _node_kinds(node, seen: set[str]) -> None:
    if isinstance(node, ir.Node):
        seen.add(type(node).__name__ + ":" + str(getattr(node, "kind", "")))
        if isinstance(node, ir.Binary):
            seen.add("op:" + node.op)
        for value in node.__dict__.values():
            _node_kinds(value, seen)
    elif isinstance(node, tuple):
        for x in node:
            _node_kinds(x, seen)


def test_strategies_cover_every_node_kind() -> None:
    """A guard that the generators above still produce every node kind (so a renamed field fails loudly)."""
    seen: set[str] = set()

    @settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=SLOW_OK)
    @given(definitions())
    def collect_defs(d: ir.Definition) -> None:
        _node_kinds(d, seen)

    @settings(max_examples=600, deadline=None, derandomize=True, database=None, suppress_health_check=SLOW_OK)
    @given(exprs)
    def collect_exprs(e: ir.Expr) -> None:
        _node_kinds(e, seen)

    collect_defs()
    collect_exprs()
    kinds = {"Literal_:literal", "Name:name", "Attr:attr", "Index:index", "Call:call", "ListExpr:list",
             "Unary:unary", "Binary:binary", "Module:module", "Use:use", "Each:each", "FusedTensor:tensor",
             "ExpertFn:fn", "Scale:scale", "CallSig:call", "Ckpt:ckpt", "Let:let", "Fragment:fragment",
             "LayerKind:layer", "Header:", "Tower:", "ExtraSlots:extra"}
    assert kinds <= seen, kinds - seen
    assert {"op:" + op for op in BINARY_OPS} <= seen, {"op:" + op for op in BINARY_OPS} - seen


# ---- specific shapes the printer must get right -------------------------------------------------------

TRICKY = [
    "a ?? b ?? c", "a ?? (b ?? c)", "(a + b) * c", "a - (b - c)", "a - b - c", "-a.b", "(-a).b", "(-3).x",
    "(1).x", "1.5.x", "--3", "-(-a)", "not not a", "not (a and b)", "(not a) == b", "a == (not b)",
    "not (a in b)", "a not in b", "(a < b) == c", "a < (b < c)", "a * (b ?? c)", "a * b ?? c", "-(a ?? b)",
    "-a ?? b", "[1, [2, -3]][0]", "len([]).x", "min(1, 2)[0]", "config.mlp_only_layers[i - 1]",
    "\"a\\\"b\\n\"", "1e+100", "-1.5e-07", "a or b and c", "(a or b) and c", "a + -3", "a - -3",
    "not (a ?? b)", "not -a",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_expression_forms_roundtrip(text: str) -> None:
    e = parser.parse(f"arch a\nlet x = {text}\n").lets[0].value
    printed = printer.expr(e)
    again = parser.parse(f"arch a\nlet x = {printed}\n").lets[0].value
    assert again == e
    assert printer.expr(again) == printed


def test_int_literal_attribute_is_parenthesised() -> None:
    e = ir.Attr(obj=ir.Literal_(value=1), attr="x")
    assert printer.expr(e) == "(1).x"


def test_documented_negative_literal_corner() -> None:
    """`Unary("-", 3)` prints as `-3`, which reads back as the literal -3 (documented, not a bug)."""
    e = ir.Unary(op="-", operand=ir.Literal_(value=3))
    assert printer.expr(e) == "-3"
    assert parser.parse("arch a\nlet x = -3\n").lets[0].value == ir.Literal_(value=-3)


def test_docs_attach_to_items_and_survive() -> None:
    text = (
        "// header doc\narch a\nlayers model.layers\n\n// let doc\nlet x = 1\n\n// frag doc\nfragment f {\n"
        "  // item doc\n  q:0\n  // block doc\n  b {\n    // inner\n    c:!\n  }\n}\n\n// kind doc\n"
        "layer k otherwise {\n  use f\n}\n\n// trailing\n"
    )
    d = parser.parse(text)
    assert d.header.doc == (" header doc",)
    assert d.lets[0].doc == (" let doc",)
    frag = d.fragments[0]
    assert frag.doc == (" frag doc",)
    assert frag.items[0].doc == (" item doc",)
    assert frag.items[1].doc == (" block doc",)
    assert frag.items[1].children[0].doc == (" inner",)
    assert d.layers[0].doc == (" kind doc",)
    assert d.trailing_doc == (" trailing",)
    assert printer.definition(d) == text


def test_same_line_comment_belongs_to_its_item() -> None:
    d = parser.parse("arch a\nlayer k otherwise {\n  q:0 // quantized first\n  k:0\n}\n")
    assert d.layers[0].items[0].doc == (" quantized first",)
    assert d.layers[0].items[1].doc == ()


# ---- the shipped library --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_DEFS, ids=[p.name for p in MODEL_DEFS])
def test_model_defs_are_canonical_or_format_idempotently(path: Path) -> None:
    text = path.read_text()
    d = parser.parse(text, str(path))
    once = printer.definition(d)
    assert parser.parse(once) == d
    assert printer.definition(parser.parse(once)) == once  # canonical or not, formatting is stable


def test_model_defs_exist() -> None:
    assert MODEL_DEFS, "model_defs/ has no .moedef files"
