"""A definition bound to one model: concrete paths, shapes and checkpoint names, no tensors.

This is the contract between `bind` (which knows the IR and a model instance) and the
compiler (which turns it into a hook plan). All paths are relative to a decoder layer
unless the field says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from moedsl.lang import ir


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BoundLinear(Frozen):
    """An nn.Linear weight to quantize."""

    path: str
    stage: int
    in_features: int
    out_features: int
    bias: bool
    ckpt: str  # checkpoint module name (the key without `.weight`), relative to the layer
    shared_expert: bool = False  # inside a `:moe-share` block: sees every token
    expert: int | None = None  # one expert of a ModuleList
    proj: ir.ProjRole | None = None  # its role inside that expert


class BoundGrouped(Frozen):
    """A `:grouped` container to quantize: E Linears stored as one [E, out, in] `weight`, called as
    `container(rows, sizes)` (rows sorted by expert, sizes[e] rows for expert e; JetMoE's parallel
    experts). Each expert is quantized with the rows the model really routes to it."""

    path: str
    stage: int
    experts: int
    in_features: int
    out_features: int
    ckpt: str  # the container's checkpoint module name (its key is `ckpt.weight`), relative to the layer
    module_class: str


class BoundTensor(Frozen):
    """A fused expert parameter and the per-expert projections it holds."""

    name: str  # parameter path relative to the experts module
    layout: ir.Orientation
    split: Literal["concat", "interleave", "one"]
    roles: tuple[ir.ProjRole, ...]
    stage: int | None
    skip: bool
    bias: str | None
    ckpt: str | None = None  # with ckpt_fused: the checkpoint key (relative to the layer) if not the runtime name
    shape: tuple[int, ...]
    out_features: int  # of one role of one expert
    in_features: int
    stored_experts: int | None = None  # experts on the first axis: E, or E + the extra slots (LongCat's gate_up_proj)


class BoundExperts(Frozen):
    path: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    fn: ir.ExpertFn
    scale: Literal["output", "input"]
    call: tuple[ir.CallArg, ...]
    tensors: tuple[BoundTensor, ...] = ()  # fused storage
    module_list: tuple[BoundLinear, ...] = ()  # ModuleList storage: expert 0's linears, `expert=0`
    ckpt: dict[str, str]  # role -> checkpoint name template with `{e}`, relative to the layer
    ckpt_fused: bool = False
    module_class: str
    slots: tuple[Literal["identity", "zero"], ...] = ()  # weightless router slots E, E+1, ... (`extra`)

    @property
    def grouped(self) -> bool:
        """The experts are grouped containers of the `:moe` block itself (`call(rows, sizes)`): each tensor
        `CONTAINER.PARAM` belongs to a container called as `container(rows, sizes)`."""
        return self.call == ir.GROUPED_CALL

    @property
    def first_role(self) -> str:
        """The role whose container a block with grouped experts calls first: gate (or up, with no gate)."""
        return "gate" if any("gate" in t.roles for t in self.tensors) else "up"

    def container(self, role: str) -> str:
        """The grouped container (relative to the experts module) holding `role`."""
        return next(t.name.rpartition(".")[0] for t in self.tensors if role in t.roles)

    def role_stage(self, role: str) -> int | None:
        for t in self.tensors:
            if role in t.roles:
                return t.stage
        for lin in self.module_list:
            if lin.proj == role:
                return lin.stage
        return None


class BoundMoe(Frozen):
    path: str
    router: str | None
    shared: tuple[str, ...]  # `:moe-share` module paths
    experts: BoundExperts
    module_class: str


class BoundKind(Frozen):
    name: str
    layers: tuple[int, ...]
    layer_class: str
    linears: tuple[BoundLinear, ...]
    moe: tuple[BoundMoe, ...] = ()
    grouped: tuple[BoundGrouped, ...] = ()  # `:grouped` containers
    skipped: tuple[str, ...] = ()  # `:!` and router subtrees


class BoundDefinition(Frozen):
    arch: str
    model_type: str
    model_class: str
    num_layers: int
    layers_path: str  # from the model root
    layers_ckpt: str = ""  # the checkpoint's name for the decoder-layer list (`layers ... @ "..."`), else layers_path
    embed: str | None
    final_norm: str | None
    lm_head: str | None
    num_experts: int | None
    top_k: int | None
    hidden_size: int
    carry: tuple[str, ...] = ()  # see ir.Header.carry
    kinds: tuple[BoundKind, ...]
    kind_of_layer: tuple[str, ...]  # per layer index
    language_model: str | None = None  # a composite's text decoder, from the model root (calibration calls it)
    towers: tuple[str, ...] = ()  # a composite's modules outside the language model, copied unquantized

    def kind(self, name: str) -> BoundKind:
        return next(k for k in self.kinds if k.name == name)
