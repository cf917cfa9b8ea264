"""The typed IR of a `.moedef` definition: frozen Pydantic models, one per concept.

The parser builds it, the printer writes it back (parse(print(ir)) == ir), the binder checks
it against a model and the compiler turns it into a hook plan. Positions in the source are
kept on each node as `span` for error messages; they take no part in equality, so two
definitions that say the same thing are equal wherever they were written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from moedsl.errors import Span


class Node(BaseModel):
    """Base of every IR node: frozen, typed, compared without source positions."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    span: Span | None = Field(default=None, exclude=True, repr=False)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(self.model_dump()))


# ---- expressions -----------------------------------------------------------------------

BinaryOperator = Literal["+", "-", "*", "/", "%", "??", "==", "!=", "<", "<=", ">", ">=", "in", "not in", "and", "or"]


class Literal_(Node):
    kind: Literal["literal"] = "literal"
    value: bool | int | float | str | None


class Name(Node):
    """`i` (the layer index), `config`, or a `let` name."""

    kind: Literal["name"] = "name"
    id: str


class Attr(Node):
    kind: Literal["attr"] = "attr"
    obj: Expr
    attr: str


class Index(Node):
    kind: Literal["index"] = "index"
    obj: Expr
    index: Expr


class Call(Node):
    """A call of one of the few built-in functions (len, min, max, floordiv, range, ...)."""

    kind: Literal["call"] = "call"
    func: str
    args: tuple[Expr, ...] = ()


class ListExpr(Node):
    kind: Literal["list"] = "list"
    items: tuple[Expr, ...] = ()


class Unary(Node):
    kind: Literal["unary"] = "unary"
    op: Literal["-", "not"]
    operand: Expr


class Binary(Node):
    kind: Literal["binary"] = "binary"
    op: BinaryOperator
    left: Expr
    right: Expr


Expr = Annotated[
    Union[Literal_, Name, Attr, Index, Call, ListExpr, Unary, Binary],
    Field(discriminator="kind"),
]


# ---- module tree -----------------------------------------------------------------------

Role = Literal["moe", "moe-share", "router", "experts"]
ProjRole = Literal["gate", "up", "down"]
ROLES: tuple[str, ...] = ("moe", "moe-share", "router", "experts")
PROJ_ROLES: tuple[str, ...] = ("gate", "up", "down")


class Module(Node):
    """A submodule path with annotations, optionally with children.

    `names` are alternatives (`a|b`), each a dotted path relative to the parent.
    """

    kind: Literal["module"] = "module"
    names: tuple[str, ...]
    stage: int | None = None  # `:N`: quantize in stage N
    skip: bool = False  # `:!`: run, never quantize (the whole subtree)
    optional: bool = False  # `:?`: may be absent
    role: Role | None = None  # `:moe`, `:moe-share`, `:router`, `:experts`
    ckpt: str | None = None  # `@ "name"`: checkpoint name, relative to the layer
    proj: ProjRole | None = None  # `as gate|up|down`: role inside a ModuleList expert
    # `:grouped`: a staged module holding E Linears as one [E, out, in] `weight`, called as
    # `module(rows, sizes)` (rows sorted by expert, sizes[e] rows for expert e): JetMoE's parallel experts
    grouped: bool = False
    children: tuple[Item, ...] | None = None
    doc: tuple[str, ...] = ()


class Use(Node):
    """`use NAME`: splice a fragment's items here."""

    kind: Literal["use"] = "use"
    fragment: str
    doc: tuple[str, ...] = ()


class Each(Node):
    """`# { ... }`: every child of a ModuleList (one expert each)."""

    kind: Literal["each"] = "each"
    children: tuple[Item, ...] = ()
    doc: tuple[str, ...] = ()


Orientation = Literal["E,out,in", "E,in,out", "E*out,in", "E*in,out"]
ORIENTATIONS: tuple[str, ...] = ("E,out,in", "E,in,out", "E*out,in", "E*in,out")


class FusedTensor(Node):
    """`tensor NAME [layout] split :stage [bias NAME]`: one parameter holding all experts.

    layout: `[E,out,in]` per-expert nn.Linear orientation; `[E,in,out]` transposed;
    `[E*out,in]` / `[E*in,out]`: flat 2-D storage of E stacked experts (DBRX).
    split: `concat(gate, up)` (halves along out), `interleave(gate, up)` (even/odd rows
    along out), or a single role (`down`).
    `@ "key"` (only with `ckpt fused`): the checkpoint key of the fused tensor, relative to the
    layer, when it differs from the runtime name (granitemoe's `block_sparse_moe.input_linear.weight`).
    """

    kind: Literal["tensor"] = "tensor"
    name: str
    layout: Orientation
    split: Literal["concat", "interleave", "one"]
    roles: tuple[ProjRole, ...]
    stage: int | None = None
    skip: bool = False
    bias: str | None = None
    ckpt: str | None = None  # `@ "key"`: with `ckpt fused`, the key the checkpoint stores this tensor under
    doc: tuple[str, ...] = ()


Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_clamped"]
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


class ExpertFn(Node):
    """`fn glu(silu)`, `fn mlp(relu2)`, `fn swiglu_clamped(alpha=1.702, limit=7.0)`.

    glu: down(act(gate(x)) * up(x)); mlp: down(act(up(x))) with no gate;
    swiglu_clamped (gpt-oss): g = min(gate, limit), u = clamp(up, -limit, limit),
    down((u + 1) * g * sigmoid(alpha * g)).
    """

    kind: Literal["fn"] = "fn"
    form: Literal["glu", "mlp", "swiglu_clamped"]
    act: Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid"] | None = None
    alpha: float | None = None
    limit: float | None = None
    doc: tuple[str, ...] = ()


class Scale(Node):
    """`scale output` (routing weights scale each expert's output) or `scale input`."""

    kind: Literal["scale"] = "scale"
    where: Literal["output", "input"]
    doc: tuple[str, ...] = ()


CallArg = Literal["hidden", "index", "weights", "scores", "_", "rows", "sizes"]
CALL_ARGS: tuple[str, ...] = ("hidden", "index", "weights", "scores", "_", "rows", "sizes")
# `call(rows, sizes)`: the experts sit in grouped containers inside the `:moe` block itself, each container
# called as `container(rows, sizes)` (rows sorted by expert, sizes[e] rows for expert e)
GROUPED_CALL: tuple[str, ...] = ("rows", "sizes")


class CallSig(Node):
    """`call(hidden, index, weights)`: what the experts module's positional arguments are.

    hidden [T,H] tokens; index [T,k] chosen experts; weights [T,k] their routing weights;
    scores [T,E] dense routing weights; `_` an argument the executor ignores.
    `call(rows, sizes)` (exactly this): the experts are grouped containers inside the `:moe` block, each
    called with the rows routed to its experts, sorted by expert, and the number of rows per expert.
    """

    kind: Literal["call"] = "call"
    args: tuple[CallArg, ...]
    doc: tuple[str, ...] = ()


class Ckpt(Node):
    """`ckpt gate "mlp.experts.{e}.gate_proj"` or `ckpt fused`.

    Names are relative to the decoder layer; `{e}` is the expert index. `ckpt fused`
    says the checkpoint stores the fused tensors themselves under their runtime names.
    """

    kind: Literal["ckpt"] = "ckpt"
    role: ProjRole | None = None  # None with fused=True
    template: str | None = None
    fused: bool = False
    doc: tuple[str, ...] = ()


class ExtraSlots(Node):
    """`extra identity(N)` / `extra zero(N)`: N router slots after the E experts (and after earlier
    `extra` slots) that have no weights: an identity slot returns its input, a zero slot nothing
    (LongCat-Flash's "zero-computation experts"). They are routed to, and never get statistics."""

    kind: Literal["extra"] = "extra"
    what: Literal["identity", "zero"]
    count: Expr
    doc: tuple[str, ...] = ()


Item = Annotated[
    Union[Module, Use, Each, FusedTensor, ExpertFn, Scale, CallSig, Ckpt, ExtraSlots],
    Field(discriminator="kind"),
]


# ---- top level ---------------------------------------------------------------------------


class Let(Node):
    kind: Literal["let"] = "let"
    name: str
    value: Expr
    doc: tuple[str, ...] = ()


class Fragment(Node):
    kind: Literal["fragment"] = "fragment"
    name: str
    items: tuple[Item, ...] = ()
    doc: tuple[str, ...] = ()


class LayerKind(Node):
    """`layer NAME when EXPR { ... }` or `layer NAME otherwise { ... }` (when=None)."""

    kind: Literal["layer"] = "layer"
    name: str
    when: Expr | None = None
    items: tuple[Item, ...] = ()
    doc: tuple[str, ...] = ()


class Tower(Node):
    """One entry of `towers`: a module of a composite model outside its language model (a vision or
    audio encoder, a projector), copied to the output unquantized. `:?`: absent in some checkpoints."""

    names: tuple[str, ...]
    optional: bool = False


class Header(Node):
    """The architecture-wide facts. Paths are alternatives of dotted paths from the model root."""

    name: str
    extends: str | None = None
    matches: tuple[str, ...] = ()
    experts: Expr | None = None
    top_k: Expr | None = None
    layers: tuple[str, ...] | None = None
    # `layers model.layers @ "backbone.layers"`: the checkpoint's name for the decoder-layer list when it is
    # not the runtime path (nemotron_h saves `backbone.layers`, runs `model.layers`); None: the runtime path
    layers_ckpt: str | None = None
    embed: tuple[str, ...] | None = None
    final_norm: tuple[str, ...] | None = None
    lm_head: tuple[str, ...] | None = None
    # `carry a, b`: a decoder layer returns (hidden, x_a, x_b) and the next layer takes x_a, x_b as
    # the keyword arguments `a`, `b` (the first layer gets none); glm_moe_dsa's `prev_topk_indices`
    carry: tuple[str, ...] = ()
    # composite models: `language_model PATHS` the text decoder inside a `…ForConditionalGeneration`
    # (calibration calls it with token ids); `text_config EXPR` what `config` means in every other
    # expression (the text decoder's config); `towers` the modules outside it, kept as they are
    language_model: tuple[str, ...] | None = None
    text_config: Expr | None = None
    towers: tuple[Tower, ...] = ()
    doc: tuple[str, ...] = ()
    # where each header statement was written (field -> span), for errors about one statement
    spans: dict[str, Span] = Field(default_factory=dict, exclude=True, repr=False)


class Definition(Node):
    """One `.moedef` file (before `extends` and `use` are resolved) or a resolved definition."""

    header: Header
    lets: tuple[Let, ...] = ()
    fragments: tuple[Fragment, ...] = ()
    layers: tuple[LayerKind, ...] = ()
    trailing_doc: tuple[str, ...] = ()
    source_file: str | None = Field(default=None, exclude=True, repr=False)

    def fragment(self, name: str) -> Fragment | None:
        return next((f for f in self.fragments if f.name == name), None)


for _model in (Attr, Index, Call, ListExpr, Unary, Binary, Let, Module, Each, ExtraSlots, Fragment, LayerKind, Tower,
               Header,
               Definition):
    _model.model_rebuild()


def join_path(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` at the root."""
    return f"{prefix}.{name}" if prefix else name


def walk_items(items: tuple[Any, ...]):
    """Every item in a tree, depth first (fragments are not followed)."""
    for item in items:
        yield item
        children = getattr(item, "children", None)
        if children:
            yield from walk_items(children)
