"""Compiling a bound definition into a hook plan: stages, targets, statistics keys, captures.

    compile_plan(definition, model, policy, tokens)   bind, then compile
    compile_bound(bound, policy, tokens, definition)  compile an existing BoundDefinition

The compiler knows the bound model (paths, shapes, checkpoint names) and the routing policy;
it knows nothing of GPTQ. Per layer kind it produces the stages in stage-number order, and
per stage:

* **targets**: one per nn.Linear (`kind="linear"`), one per `:grouped` container (`kind="grouped"`,
  covering its E experts; id `{container}.{e}`), one per role of a fused experts tensor
  (`kind="fused"`, covering all E experts; id `{experts}.{e}.{role}_proj`), one per linear of a
  ModuleList expert (`kind="module_list"`, path `{experts}.{e}.<rel>`). `:!` tensors give none.
* **statistics keys** (one Hessian each, or E with `{e}`):
  - linears of one parent module, one stage and one in_features share a key, named
    `parent[a,b,c]:in` (a group) or `parent.a:in` (alone), captured at the input of the first
    member in tree order (the executor checks at run time that the members read one tensor);
    shared-expert linears follow the same rule and get keys of their own;
  - an experts block's gate/up read the experts module's input: under `all`, ONE key
    `{experts}[gate_proj,up_proj]:in` for every expert (`per_expert=False`); under
    routed/topk/auto, `{experts}.{e}[gate_proj,up_proj]:in` (`per_expert=True`, routed tokens).
    Exception: with `scale input` (routing weights scale the expert's *input*, Llama-4) each
    expert reads a differently scaled tensor, so the key is per expert under `all` too;
  - down reads each expert's hidden activation: always per expert,
    `{experts}.{e}.down_proj:in`, captured as `experts_hidden`;
  - a `:grouped` container: per expert, `{container}.{e}:in`, captured as `grouped_input` (the rows the
    container is called with, split by the sizes it is called with).
* **captures**, in tree order, and **stop_after**: the capture that comes last in the
  definition's tree order. Tree order is taken as execution order; the executor still stops
  only once every capture of the stage has fired.
* **memory**: `hessian_bytes` = Σ features² · 4 · (E if per expert); `activation_bytes` =
  tokens · Σ width · 2 (bf16), where linear and experts-input captures have the input width,
  experts-hidden captures the expert intermediate width, and expert captures under a routed
  policy count tokens · k rows (k = top_k, or N of `topk=N`); under `all` the hidden capture
  counts one expert's activation at a time (the executor derives it expert by expert).
  A kind's memory is the sum over its stages; the peak is the largest stage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moedsl.bind.bound import BoundDefinition, BoundExperts, BoundKind, BoundMoe
from moedsl.errors import MoedslError
from moedsl.lang import ir
from moedsl.plan.schema import (DEFAULT_TOKENS, CapturePoint, HookPlan, KindPlan, Memory, Policy, Stage, StatsKey,
                                 Target)

HESSIAN_DTYPE_BYTES = 4  # fp32
ACTIVATION_DTYPE_BYTES = 2  # bf16

GATE_UP: tuple[str, ...] = ("gate", "up")


def compile_plan(definition: ir.Definition | str | Path, model: Any, policy: str | Policy = "routed",
                 tokens: int = DEFAULT_TOKENS) -> HookPlan:
    """Bind a resolved definition (or a file / library name) to `model` and compile the hook plan."""
    from moedsl.bind.binder import bind

    if not isinstance(definition, ir.Definition):
        from moedsl.lang.library import load

        definition = load(definition)
    pol = as_policy(policy)
    _check_tokens(tokens)
    bound = bind(definition, model)
    return compile_bound(bound, pol, tokens, definition=definition)


def compile_bound(bound: BoundDefinition, policy: str | Policy = "routed", tokens: int = DEFAULT_TOKENS,
                  definition: ir.Definition | None = None) -> HookPlan:
    """Compile a BoundDefinition. `definition` (the resolved IR it was bound from) gives the tree
    order of the experts relative to other modules; without it the experts of a block are placed
    after the block's own linears (the bound order)."""
    pol = as_policy(policy)
    _check_tokens(tokens)
    if pol.kind == "topk" and bound.num_experts is not None and pol.top_k > bound.num_experts:
        raise MoedslError(f"policy `{pol}`: the model has only {bound.num_experts} experts per block")
    kinds = []
    for bk in bound.kinds:
        ir_kind = next((k for k in definition.layers if k.name == bk.name), None) if definition else None
        kinds.append(_KindCompiler(bound, bk, pol, tokens, ir_kind).compile())
    return HookPlan(
        arch=bound.arch, model_type=bound.model_type, model_class=bound.model_class, num_layers=bound.num_layers,
        layers_path=bound.layers_path, layers_ckpt=bound.layers_ckpt, embed=bound.embed, final_norm=bound.final_norm, lm_head=bound.lm_head,
        num_experts=bound.num_experts, top_k=bound.top_k, hidden_size=bound.hidden_size, policy=pol, tokens=tokens,
        carry=bound.carry, kinds=tuple(kinds), kind_of_layer=bound.kind_of_layer,
        language_model=bound.language_model, towers=bound.towers)


def as_policy(policy: str | Policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return Policy.parse(policy)
    raise MoedslError(f"a policy is a string or a Policy, not {type(policy).__name__}",
                      expected=["routed", "all", "topk=N", "auto(min_tokens=N)"])


def _check_tokens(tokens: Any) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise MoedslError(f"`tokens` must be a positive integer, not {tokens!r}")


def _group_name(parent: str, members: list[str], suffix: str = ":in") -> str:
    if len(members) == 1:
        return f"{ir.join_path(parent, members[0])}{suffix}"
    return f"{parent}[{','.join(members)}]{suffix}"


# ---- tree order --------------------------------------------------------------------------------


def tree_order(kind: ir.LayerKind, bk: BoundKind) -> dict[str, int]:
    """Pre-order position of every bound path (and its ancestors) in the definition's tree."""
    known: set[str] = set()

    def add(path: str | None) -> None:
        while path:
            known.add(path)
            path = path.rpartition(".")[0]

    for lin in bk.linears:
        add(lin.path)
    for g in bk.grouped:
        add(g.path)
    for s in bk.skipped:
        add(s)
    for moe in bk.moe:
        add(moe.path)
        add(moe.router)
        for s in moe.shared:
            add(s)
        add(moe.experts.path)
        for lin in moe.experts.module_list:
            add(lin.path)
    order: dict[str, int] = {}

    def walk(items: tuple, prefixes: list[str]) -> None:
        for it in items:
            if isinstance(it, ir.Module):
                hits = [p for p in (ir.join_path(pre, alt) for pre in prefixes for alt in it.names) if p in known]
                for h in hits:
                    order.setdefault(h, len(order))
                if it.children and hits:
                    walk(it.children, hits)
            elif isinstance(it, ir.Each):
                walk(it.children, [f"{p}.0" for p in prefixes])

    walk(kind.items, [""])
    return order


def bound_order(bk: BoundKind) -> dict[str, int]:
    """Fallback order without the IR: linears as bound; experts after their block's linears."""
    order = {lin.path: 2 * i for i, lin in enumerate(bk.linears)}
    for j, g in enumerate(bk.grouped):
        order[g.path] = 2 * (len(bk.linears) + j)
    for moe in bk.moe:
        inside = [2 * i for i, lin in enumerate(bk.linears) if lin.path.startswith(moe.path + ".")]
        order[moe.experts.path] = (max(inside) if inside else 2 * len(bk.linears)) + 1
    return order


# ---- one layer kind ------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A target with its position in tree order (float: experts roles sub-order)."""

    pos: float
    target: Target


@dataclass
class _StageAcc:
    entries: list[_Entry] = field(default_factory=list)
    keys: dict[str, tuple[float, StatsKey]] = field(default_factory=dict)
    captures: dict[CapturePoint, tuple[float, int, int]] = field(default_factory=dict)  # pos, width, rows factor


class _KindCompiler:
    def __init__(self, bound: BoundDefinition, bk: BoundKind, policy: Policy, tokens: int,
                 ir_kind: ir.LayerKind | None):
        self.bound, self.bk, self.policy, self.tokens = bound, bk, policy, tokens
        self.order = tree_order(ir_kind, bk) if ir_kind is not None else bound_order(bk)
        self.stages: dict[int, _StageAcc] = defaultdict(_StageAcc)

    def pos(self, path: str) -> float:
        if path in self.order:
            return float(self.order[path])
        # a path the IR walk did not reach (should not happen): after everything, in bound order
        return float(len(self.order) + len(path))

    def routed_rows(self, ex: BoundExperts) -> int:
        """Rows per token that expert captures hold under a routed policy."""
        if self.policy.kind == "all":
            return 1
        if self.policy.kind == "topk" and self.policy.top_k is not None:
            return self.policy.top_k
        return self.bound.top_k or ex.num_experts

    def add_key(self, stage: int, key: StatsKey, pos: float, width: int, rows: int, cap_pos: float) -> None:
        acc = self.stages[stage]
        if key.key in acc.keys and acc.keys[key.key][1] != key:
            raise MoedslError(f"layer kind `{self.bk.name}`, stage {stage}: statistics key `{key.key}` is defined "
                              f"twice with different inputs")
        acc.keys.setdefault(key.key, (pos, key))
        acc.captures.setdefault(key.capture, (cap_pos, width, rows))

    def add_target(self, stage: int, pos: float, target: Target) -> None:
        self.stages[stage].entries.append(_Entry(pos, target))

    # -- linears -----------------------------------------------------------------------------------

    def linears(self) -> None:
        groups: dict[tuple, list] = {}
        for lin in self.bk.linears:
            parent = lin.path.rpartition(".")[0]
            groups.setdefault((parent, lin.stage, lin.in_features, lin.shared_expert), []).append(lin)
        for (parent, stage, in_f, _shared), members in groups.items():
            members.sort(key=lambda l: self.pos(l.path))
            first = members[0]
            name = _group_name(parent, [m.path.rpartition(".")[2] for m in members])
            cap = CapturePoint(kind="linear_input", path=first.path)
            key = StatsKey(key=name, capture=cap, features=in_f, per_expert=False, experts=None, tokens="all")
            self.add_key(stage, key, self.pos(first.path), in_f, 1, self.pos(first.path))
            for lin in members:
                self.add_target(stage, self.pos(lin.path), Target(
                    id=lin.path, kind="linear", path=lin.path, in_features=lin.in_features,
                    out_features=lin.out_features, bias="bias" if lin.bias else None, ckpt=lin.ckpt, stats=name,
                    shared_expert=lin.shared_expert))

    # -- experts -------------------------------------------------------------------------------------

    def experts(self, moe: BoundMoe) -> None:
        ex = moe.experts
        E = ex.num_experts
        base = self.pos(ex.path)
        prefix = f"{ex.path}.{{e}}."
        # (stage, role, rel id, target without stats)
        items: list[tuple[int, str, str, dict]] = []
        for t in ex.tensors:
            if t.skip:
                continue
            assert t.stage is not None  # resolve() guarantees a stage or `:!`
            for r in t.roles:
                rel = f"{r}_proj"
                # `ckpt fused`: written per expert under the experts module (grouped experts: their container)
                ckpt = prefix + rel if ex.ckpt_fused and not ex.grouped else ex.ckpt.get(r, prefix + rel)
                items.append((t.stage, r, rel, dict(
                    id=ckpt if ex.grouped else prefix + rel, kind="fused", path=ex.path, param=t.name, role=r, experts=E, layout=t.layout,
                    split=t.split, roles=t.roles, bias=t.bias, in_features=t.in_features,
                    out_features=t.out_features, ckpt=ckpt)))
        roles_count = defaultdict(int)
        for lin in ex.module_list:
            roles_count[lin.proj] += 1
        for lin in ex.module_list:
            if lin.proj is None:
                raise MoedslError(f"`{lin.path}` of the ModuleList experts `{ex.path}` has no role: mark it "
                                  f"`as gate`, `as up` or `as down` so its input is known")
            tid = lin.path.replace(f"{ex.path}.0.", prefix, 1)
            rel = tid[len(prefix):]
            if roles_count[lin.proj] == 1 and lin.proj in ex.ckpt:
                ckpt = ex.ckpt[lin.proj]
            else:
                ckpt = lin.ckpt.replace(f"{ex.path}.0.", prefix, 1)
            items.append((lin.stage, lin.proj, rel, dict(
                id=tid, kind="module_list", path=tid, role=lin.proj, experts=E,
                bias="bias" if lin.bias else None, in_features=lin.in_features, out_features=lin.out_features,
                ckpt=ckpt)))
        rows = self.routed_rows(ex)
        everything = self.policy.kind == "all"
        tokens = "all" if everything else "routed"
        by_stage: dict[int, list] = defaultdict(list)
        for j, it in enumerate(items):
            by_stage[it[0]].append((j, *it))
        for stage, entries in by_stage.items():
            inputs = [e for e in entries if e[2] in GATE_UP]
            if inputs:
                rels = [e[3] for e in inputs]
                features = inputs[0][4]["in_features"]
                cap = CapturePoint(kind="experts_input", path=ex.path)
                if everything and ex.scale == "output":
                    key = StatsKey(key=f"{ex.path}[{','.join(rels)}]:in", capture=cap, features=features,
                                   per_expert=False, experts=None, tokens="all")
                else:
                    key = StatsKey(key=_group_name(f"{ex.path}.{{e}}", rels), capture=cap, features=features,
                                   per_expert=True, experts=E, tokens=tokens)
                self.add_key(stage, key, base + 0.01 * (inputs[0][0] + 1), features, rows, base + 0.001)
                for j, _s, _r, _rel, t in inputs:
                    self.add_target(stage, base + 0.01 * (j + 1), Target(**t, stats=key.key))
            for j, _s, r, rel, t in entries:
                if r in GATE_UP:
                    continue
                features = t["in_features"]
                cap = CapturePoint(kind="experts_hidden", path=ex.path)
                key = StatsKey(key=f"{prefix}{rel}:in", capture=cap, features=features, per_expert=True, experts=E,
                               tokens=tokens)
                self.add_key(stage, key, base + 0.01 * (j + 1), features, rows, base + 0.002)
                self.add_target(stage, base + 0.01 * (j + 1), Target(**t, stats=key.key))

    # -- grouped containers ------------------------------------------------------------------------

    def grouped(self) -> None:
        """A `:grouped` container: one Hessian per expert, from the rows the model routes to it (whatever the
        policy, which applies to `:moe` blocks: these rows are all the inputs an expert ever reads)."""
        for g in self.bk.grouped:
            E = g.experts
            cap = CapturePoint(kind="grouped_input", path=g.path)
            key = StatsKey(key=f"{g.path}.{{e}}:in", capture=cap, features=g.in_features, per_expert=True, experts=E,
                           tokens="routed")
            pos = self.pos(g.path)
            self.add_key(g.stage, key, pos, g.in_features, self.bound.top_k or E, pos)
            self.add_target(g.stage, pos, Target(
                id=f"{g.path}.{{e}}", kind="grouped", path=g.path, experts=E, layout="E,out,in", split="one",
                in_features=g.in_features, out_features=g.out_features, ckpt=f"{g.ckpt}.{{e}}", stats=key.key))

    # -- assembly ------------------------------------------------------------------------------------

    def compile(self) -> KindPlan:
        self.linears()
        self.grouped()
        for moe in self.bk.moe:
            self.experts(moe)
        stages = []
        for index in sorted(self.stages):
            acc = self.stages[index]
            targets = tuple(e.target for e in sorted(acc.entries, key=lambda e: e.pos))
            keys = tuple(k for _, k in sorted(acc.keys.values(), key=lambda pk: pk[0]))
            caps = sorted(acc.captures.items(), key=lambda kv: kv[1][0])
            hessian = sum(k.features ** 2 * HESSIAN_DTYPE_BYTES * ((k.experts or 1) if k.per_expert else 1)
                          for k in keys)
            activation = sum(self.tokens * rows * width * ACTIVATION_DTYPE_BYTES for _, (_, width, rows) in caps)
            stages.append(Stage(index=index, targets=targets, stats=keys, captures=tuple(c for c, _ in caps),
                                stop_after=caps[-1][0] if caps else None,
                                memory=Memory(hessian_bytes=hessian, activation_bytes=activation)))
        ids = [t.id for s in stages for t in s.targets]
        if len(ids) != len(set(ids)):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise MoedslError(f"layer kind `{self.bk.name}`: target(s) {', '.join(dup)} appear twice")
        return KindPlan(
            name=self.bk.name, layers=self.bk.layers, layer_class=self.bk.layer_class, stages=tuple(stages),
            moe=self.bk.moe, skipped=self.bk.skipped,
            memory=Memory(hessian_bytes=sum(s.memory.hessian_bytes for s in stages),
                          activation_bytes=sum(s.memory.activation_bytes for s in stages)))


def peak_stage(kind: KindPlan, memory: str = "hessian_bytes") -> Stage | None:
    """The stage with the most `memory` (a `Memory` field; ties: the earlier stage)."""
    return max(kind.stages, key=lambda s: (getattr(s.memory, memory), -s.index), default=None)
