"""The hook plan: what the compiler produces and the executor runs. Plain, frozen data.

Per layer kind, ordered stages. A stage's targets are quantized together after one forward
of the layer that feeds their statistics. Targets reading the same tensor share one
statistics key (one Hessian): q/k/v; an expert's gate and up; under the `all` policy every
expert's gate and up and the shared experts' too. Expert targets are collapsed: one target
covers one role of all E experts of a block, and a statistics key with `{e}` in it stands
for E Hessians (one per expert).
"""

from __future__ import annotations

import re
from typing import Literal


from moedsl.bind.bound import BoundMoe, Frozen
from moedsl.errors import MoedslError
from moedsl.lang import ir


DEFAULT_TOKENS = 131072  # calibration tokens assumed by plan estimates when none are given (64 × 2048)


class Policy(Frozen):
    """How MoE experts get calibration tokens (a run option, not part of the architecture).

    routed: the tokens the router sends them; all: every token (the block's output stays the
    routed output); topk: the N highest-scoring experts per token; auto: routed, but an
    expert that saw fewer than min_tokens tokens is given every token.
    """

    kind: Literal["routed", "all", "topk", "auto"] = "routed"
    top_k: int | None = None
    min_tokens: int | None = None

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk={self.top_k}"
        if self.kind == "auto":
            return f"auto(min_tokens={self.min_tokens})"
        return self.kind

    @staticmethod
    def parse(text: str) -> "Policy":
        t = text.strip().replace(" ", "")
        if t in ("routed", "all"):
            return Policy(kind=t)
        if m := re.fullmatch(r"topk=(\d+)", t):
            if int(m[1]) < 1:
                raise MoedslError(f"policy `{text}`: N must be at least 1")
            return Policy(kind="topk", top_k=int(m[1]))
        if m := re.fullmatch(r"auto(?:\(min_tokens=(\d+)\))?", t):
            return Policy(kind="auto", min_tokens=int(m[1]) if m[1] else 16)
        raise MoedslError(f"unknown MoE policy `{text}`",
                          expected=["routed", "all", "topk=N", "auto(min_tokens=N)"])


class CapturePoint(Frozen):
    """Where a stage observes inputs.

    linear_input: the input of the nn.Linear at `path`;
    experts_input: the experts module's call (tokens and routing) at `path`;
    experts_hidden: each expert's down-projection input, computed from the declared expert
    function on the tokens of the experts module at `path` (no per-expert hooks);
    grouped_input: the rows a `:grouped` container at `path` is called with, per expert.
    """

    kind: Literal["linear_input", "experts_input", "experts_hidden", "grouped_input"]
    path: str


class StatsKey(Frozen):
    """One Hessian (or, with `{e}` in the key, one per expert)."""

    key: str
    capture: CapturePoint
    features: int  # the Hessian is features × features
    per_expert: bool = False
    experts: int | None = None  # how many Hessians when per_expert
    tokens: Literal["all", "routed"] = "all"  # all tokens of the layer, or the tokens routed to each expert


class Target(Frozen):
    """A weight to quantize: an nn.Linear, one role of all experts of a fused/ModuleList block, or
    all experts of a `:grouped` container."""

    id: str  # unique in the kind, e.g. `self_attn.q_proj` or `mlp.experts.{e}.gate_proj`
    kind: Literal["linear", "fused", "module_list", "grouped"]
    path: str  # the nn.Linear; or the experts module; or the grouped container
    param: str = "weight"  # fused: the parameter name inside the experts module
    role: ir.ProjRole | None = None
    experts: int | None = None  # E for expert targets
    layout: ir.Orientation | None = None
    split: Literal["concat", "interleave", "one"] | None = None
    roles: tuple[ir.ProjRole, ...] = ()
    bias: str | None = None
    in_features: int
    out_features: int
    ckpt: str  # checkpoint module name relative to the layer; `{e}` for expert targets
    stats: str  # the StatsKey.key it reads
    shared_expert: bool = False


class Memory(Frozen):
    hessian_bytes: int  # fp32 Hessians alive at once
    activation_bytes: int  # captured inputs if held for `tokens` tokens (bf16)


class Stage(Frozen):
    index: int
    targets: tuple[Target, ...]
    stats: tuple[StatsKey, ...]
    captures: tuple[CapturePoint, ...]
    stop_after: CapturePoint | None  # the forward may stop once this capture has fired
    memory: Memory


class KindPlan(Frozen):
    name: str
    layers: tuple[int, ...]
    layer_class: str
    stages: tuple[Stage, ...]
    moe: tuple[BoundMoe, ...] = ()
    skipped: tuple[str, ...] = ()
    memory: Memory  # the whole layer: every stage's Hessians together (peak is the largest stage)


class HookPlan(Frozen):
    arch: str
    model_type: str
    model_class: str
    num_layers: int
    layers_path: str
    layers_ckpt: str = ""  # where the checkpoint keeps the decoder layers; "" (older plans): layers_path

    @property
    def layers_ckpt_path(self) -> str:
        return self.layers_ckpt or self.layers_path
    embed: str | None
    final_norm: str | None
    lm_head: str | None
    num_experts: int | None
    top_k: int | None
    hidden_size: int
    policy: Policy
    tokens: int
    carry: tuple[str, ...] = ()  # extra layer outputs passed to the next layer as these keyword arguments
    kinds: tuple[KindPlan, ...]
    kind_of_layer: tuple[str, ...]
    language_model: str | None = None  # a composite's text decoder: calibration calls it with token ids
    towers: tuple[str, ...] = ()  # a composite's modules outside the language model, copied unquantized

    def kind(self, name: str) -> KindPlan:
        return next(k for k in self.kinds if k.name == name)

    def kind_for_layer(self, i: int) -> KindPlan:
        return self.kind(self.kind_of_layer[i])
