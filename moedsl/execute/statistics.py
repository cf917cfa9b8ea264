"""A layer's second-moment statistics for one stage, gathered by hooks during one forward.

Linear targets: a pre-hook on the module that owns a statistics key accumulates XᵀX; the other
members of the key are checked to read the same tensor. Experts never get per-expert hooks:
one hook on the experts module sees the tokens and the routing; the gate/up statistics are
XᵀX (one for all experts under `all`, per expert otherwise), and the down-projection
statistics come from the declared expert function evaluated for all experts at once with
batched matmuls, in token chunks. The forward stops as soon as every capture has fired.

Cross statistics (for solvers that ask for them, GPTAQ): before each batch's forward, the
full-precision copy of the layer (`fp_layer`, its weights as loaded) runs on the full-precision
model's inputs and records what reaches the same capture points; each quantized-stream row is
paired with the full-precision row of the same token. An expert's rows are the tokens the
*quantized* model routes to it (or every token, under `all`): its Hessian and its cross term
see the same tokens, and the full-precision routing is not used.

Hooks only record what they see; the statistics are applied from that record after each batch's
forward, in batch order. Under several ranks batch b's forward (and its full-precision one) runs on
rank b mod N alone and its record is broadcast, so the forward is split by batch while every owner
applies every batch to the very same tensors. Per-expert statistics are kept, and computed, by fixed
expert block (`distributed.expert_blocks`): a rank applies only the blocks it owns and a linear key
only when it owns it, so a block's statistics are the same bytes whichever rank, and however many
ranks, compute them. Grouped containers (`:grouped`) are applied as their hooks fire (one process only).
"""

from __future__ import annotations

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.bind.bound import BoundExperts, BoundMoe
from moedsl.errors import MoedslError
from moedsl.execute import distributed
from moedsl.execute.block_inputs import BlockInputs, block_for_next_stage, fits
from moedsl.execute.expert_calls import DeadExperts, SharedReadsRoutedOutput
from moedsl.execute.stats import BlockedHessian, Hessian
from moedsl.experts import fn as expert_fn
from moedsl.experts import weights as expert_weights
from moedsl.plan.schema import KindPlan, Stage, StatsKey


TOKEN_CHUNK = 4096  # tokens per product when every expert reads every token


class StopForward(Exception):
    """Raised by a hook once a stage has seen every input it needs."""




def _expert_bound(kind: KindPlan, path: str) -> BoundMoe:
    for moe in kind.moe:
        if moe.experts.path == path:
            return moe
    raise MoedslError(f"plan error: no MoE block owns experts `{path}`")  # pragma: no cover


def _stacked(ex: BoundExperts) -> bool:
    """Experts called with one stacked input of every expert, already scaled by the routing weights (Llama-4)."""
    return ex.call == ("hidden",)


def _routing(ex: BoundExperts, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [T, H], chosen experts [T, k]) from the experts module's call, per `call(...)`."""
    values = dict(zip(ex.call, args))
    hidden = values.get("hidden")
    if hidden is None:
        hidden = kwargs.get("hidden_states")
    index = values.get("index")
    if index is None:
        for name in ("top_k_index", "router_indices", "selected_experts"):
            index = kwargs.get(name, index)
    if hidden is None:
        raise MoedslError(f"{ex.module_class} was called without the tokens the definition's `call(...)` names")
    return hidden.reshape(-1, hidden.shape[-1]), index


def _grouped_call(args: tuple, kwargs: dict, E: int, where: str) -> tuple[torch.Tensor, list[int]]:
    """(rows [N, in], rows per expert) of a grouped container's call `container(rows, sizes)`."""
    values = [*args, *kwargs.values()]
    if len(values) < 2 or not torch.is_tensor(values[0]):
        raise MoedslError(f"`{where}` was not called as `(rows, sizes)`, as `call(rows, sizes)` / `:grouped` declares")
    rows, sizes = values[0], values[1]
    sizes = sizes.tolist() if torch.is_tensor(sizes) else [int(n) for n in sizes]
    if len(sizes) != E or sum(sizes) != rows.shape[0]:
        raise MoedslError(f"`{where}` was called with {rows.shape[0]} rows and sizes {sizes}: not {E} groups of rows")
    return rows.reshape(-1, rows.shape[-1]), sizes


def _experts_slice(weights: tuple[dict, dict], e0: int, e1: int) -> tuple[dict, dict]:
    """Experts e0..e1 of (weights, biases) by role, as `expert_weights.read` gives them."""
    w, b = weights
    return {r: v[e0:e1] for r, v in w.items()}, {r: (v[e0:e1] if v is not None else None) for r, v in b.items()}


def _block_view(ex: BoundExperts, index: torch.Tensor | None, e0: int, e1: int
                ) -> tuple[BoundExperts, torch.Tensor | None]:
    """Experts [e0, e1) as experts of their own: the choices of other experts become the dropped index E'."""
    n = e1 - e0
    sub = ex.model_copy(update={"num_experts": n})
    if index is None:
        return sub, None
    inside = (index >= e0) & (index < e1)
    return sub, torch.where(inside, index - e0, torch.full_like(index, n))


def _tokens_by_expert(index: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids sorted by expert, tokens per expert, the expert of each sorted row). Choices of the
    weightless slots after the E experts (`extra`: index ≥ E) are dropped: they have no statistics."""
    T, k = index.shape
    flat = index.reshape(-1)
    tokens = torch.arange(T, device=index.device).repeat_interleave(k)
    weighted = flat < E
    if not bool(weighted.all()):
        flat, tokens = flat[weighted], tokens[weighted]
    order = torch.argsort(flat, stable=True)
    return tokens[order], torch.bincount(flat, minlength=E), flat[order]


class LayerStatistics:
    """The statistics half of `LayerQuantizer` (moedsl/execute/layer.py), which sets the attributes
    used here: layer, kind, policy, device, chunk_bytes, batched, stop_early, skipped_expert_calls,
    routed_counts, fp_layer, ranks, and the ownership of work units (`owns_key`, `owned_blocks`)."""

    reuse_block_inputs = True  # a stage inside one MoE block runs the block alone when it can (block_inputs.py)
    block_runs = 0  # batches whose statistics pass ran the MoE block alone, not the layer
    _kept: BlockInputs | None = None  # the block inputs the last stage kept for the next one

    @torch.no_grad()
    def collect(self, stage: Stage, inputs: list[torch.Tensor], kwargs: list[dict],
                fp_inputs: list[torch.Tensor] | None = None) -> dict[str, Hessian | BlockedHessian]:
        """fp_inputs: the full-precision model's inputs to this layer, per batch, when the cross term is wanted.
        Returns the statistics of the keys (and expert blocks) this rank owns."""
        cross = fp_inputs is not None
        # the block inputs the stage before kept for this one (block_inputs.py), and whether this one keeps its own
        replay, self._kept = self._kept, None
        if replay is not None and replay.stage != stage.index:
            replay = None
        keep = None
        if self.reuse_block_inputs and not cross and inputs and inputs[0].device.type == self.device.type \
                and fits(inputs, self.chunk_bytes):
            found = block_for_next_stage(self.kind, stage)
            if found is not None:
                keep = BlockInputs(self.layer, *found, len(inputs))
        hessians: dict[str, Hessian | BlockedHessian] = {}
        for key in stage.stats:
            if key.capture.kind == "linear_input":
                if self.owns_key(stage, key.key):
                    hessians[key.key] = Hessian(key.features, self.device, cross=cross)
                continue
            blocks = self.owned_blocks(key.capture.path)
            if key.per_expert:
                hessians[key.key] = BlockedHessian(key.features, self.device, blocks, cross)
            elif blocks:
                hessians[key.key] = Hessian(key.features, self.device, cross=cross)
        fp_now: dict[str, torch.Tensor] = {}  # capture path -> the full-precision input there, this batch
        handles = []
        needed: set[str] = set()
        fired: set[str] = set()
        reference: dict[str, torch.Tensor] = {}
        # Hooks record what they see (`record`) and the statistics are applied after each batch's forward, from
        # the record (`appliers`): under several ranks batch b's forward runs on rank b mod N alone and its record
        # goes to every rank, so every owner applies every batch, in batch order, to the very same tensors.
        appliers: list = []
        calls: list[tuple[int, tuple[int | None, ...]]] = []  # (applier, payload indices) in the order seen
        payloads: list[torch.Tensor] = []
        payloads_keep: list[torch.Tensor] = []  # keeps each recorded tensor's id unique while its forward runs
        seen: dict[int, int] = {}  # id of a tensor already recorded in this forward -> its payload index

        def record(applier: int, *tensors: torch.Tensor | None) -> None:
            idx = []
            for t in tensors:
                if t is None:
                    idx.append(None)
                    continue
                if id(t) not in seen:
                    seen[id(t)] = len(payloads)
                    payloads.append(t.detach().clone(memory_format=torch.contiguous_format))
                    payloads_keep.append(t)
                idx.append(seen[id(t)])
            calls.append((applier, tuple(idx)))

        def done(path: str) -> None:
            fired.add(path)
            if self.stop_early and fired >= needed:
                raise StopForward

        # Linear inputs: the key's capture path accumulates; the other members are checked to read the same tensor
        for key in stage.stats:
            if key.capture.kind != "linear_input":
                continue
            members = [t.path for t in stage.targets if t.stats == key.key]
            for path in members:
                module = get_path(self.layer, path)
                needed.add(path)

                def apply_linear(x, x_fp, path=path, key=key):
                    if path == key.capture.path:
                        if key.key in hessians:  # else another rank's
                            hessians[key.key].add(x, x_fp)
                        reference[key.key] = x
                    else:
                        ref = reference.get(key.key)
                        if ref is not None and x is not ref and not (x.shape == ref.shape and torch.equal(x, ref)):
                            raise MoedslError(
                                f"plan error: `{path}` and `{key.capture.path}` share statistics `{key.key}` but read "
                                f"different inputs in {self.kind.layer_class}", notes=[
                                    "give them different stage numbers in the definition"])

                def hook(mod, args, kwargs_, path=path, i=len(appliers)):
                    record(i, args[0] if args else kwargs_["input"], fp_now.get(path))
                    done(path)

                appliers.append(apply_linear)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        # `:grouped` containers: the rows of each call, split by expert (applied as the hook fires: one process)
        for key in stage.stats:
            if key.capture.kind != "grouped_input":
                continue
            needed.add(key.capture.path)

            def grouped_hook(mod, args, kwargs_, key=key):
                rows, sizes = _grouped_call(args, kwargs_, key.experts, key.capture.path)
                h = hessians[key.key].parts[0]  # one block: every expert (`plan_units`)
                for e, part in enumerate(rows.split(sizes)):
                    if part.shape[0]:
                        h.add_expert(e, part)
                done(key.capture.path)

            handles.append(get_path(self.layer, key.capture.path).register_forward_pre_hook(grouped_hook,
                                                                                            with_kwargs=True))
        # Experts: one hook per experts module, for its gate/up and down statistics
        experts_keys: dict[str, list[StatsKey]] = {}
        for key in stage.stats:
            if key.capture.kind in ("experts_input", "experts_hidden"):
                experts_keys.setdefault(key.capture.path, []).append(key)
        all_tokens: dict[str, Hessian] = {}
        router_out: dict[str, torch.Tensor] = {}
        block_in: dict[str, torch.Tensor] = {}
        dead = DeadExperts(self.layer)  # the routed experts' forward, skipped while only shared experts remain
        grouped_any = any(key.capture.kind == "grouped_input" for key in stage.stats)
        if keep is not None:
            handles.append(keep.hook())
        try:  # a refusal while hooking, or any error in the forwards, leaves no hook or override behind
            for path, keys in experts_keys.items():
                moe = _expert_bound(self.kind, path)
                ex = moe.experts
                module = get_path(self.layer, path)
                needed.add(path)
                grouped_any |= ex.grouped
                if self.stop_early and not ex.grouped:
                    dead.install(moe, module)
                if self.policy.kind == "auto" and any(k.capture.kind == "experts_input" and k.per_expert for k in keys):
                    all_tokens[path] = Hessian(ex.hidden_size, self.device, cross=cross)
                if _stacked(ex):
                    if cross:
                        raise MoedslError(f"solver `{self.solver.name}` needs cross statistics, which moedsl does not "
                                          f"collect for `{path}`: its routing weights scale the experts' input "
                                          "(`scale input`), so the two models' expert inputs differ by their routing",
                                          notes=["use gptq or mse for this model"])
                    if self.policy.kind not in ("routed", "all"):
                        raise MoedslError(f"policy {self.policy} is not supported for `{path}`, whose routing weights "
                                          "scale the experts' input (`scale input`): use `routed` or `all`")
                    if moe.router is None:
                        raise MoedslError(f"`{path}` takes a stacked, router-scaled input: the definition must name "
                                          f"the router of `{moe.path}` (`:router`)")

                    def block_hook(mod, args, kwargs_, i=len(appliers)):
                        x = args[0] if args else kwargs_["hidden_states"]
                        record(i, x.reshape(-1, x.shape[-1]))

                    appliers.append(lambda x, path=path: block_in.__setitem__(path, x))

                    def scores_hook(mod, args, output, i=len(appliers), E=ex.num_experts):
                        outs = output if isinstance(output, tuple) else (output,)
                        record(i, next(o for o in outs if torch.is_tensor(o) and o.shape[-1] == E).reshape(-1, E))

                    appliers.append(lambda scores, path=path: router_out.__setitem__(path, scores))
                    handles.append(get_path(self.layer, moe.path).register_forward_pre_hook(block_hook,
                                                                                              with_kwargs=True))
                    handles.append(get_path(self.layer, moe.router).register_forward_hook(scores_hook))
                if self.policy.kind == "topk":
                    if moe.router is None:
                        raise MoedslError(f"policy {self.policy} needs the router of `{moe.path}`, which the "
                                          "definition does not name (`:router`)")
                    router = get_path(self.layer, moe.router)

                    def router_hook(mod, args, output, path=path, i=len(appliers), E=ex.num_experts,
                                    slots=ex.num_experts + len(ex.slots), grouped=ex.grouped):
                        outs = output if isinstance(output, tuple) else (output,)
                        scores = next((o for o in outs if torch.is_tensor(o) and o.dim() >= 2 and o.shape[-1] == slots
                                       and o.is_floating_point()), None)
                        if scores is None:
                            raise MoedslError(f"policy {self.policy}: the router of `{path}` returned no [T, {slots}] "
                                              "scores")
                        scores = scores.reshape(-1, slots)[:, :E]  # top-k among the experts with weights
                        if grouped:  # its experts' statistics are applied during the forward
                            router_out[path] = scores
                        else:
                            record(i, scores)

                    appliers.append(lambda scores, path=path: router_out.__setitem__(path, scores))
                    handles.append(router.register_forward_hook(router_hook))

                if ex.grouped:
                    # the block routes its tokens itself: its input is every token; the container holding the
                    # gate/up rows is called with the routed rows grouped by expert, then the hook below runs
                    def block_input_hook(mod, args, kwargs_, path=path):
                        x = args[0] if args else next(iter(kwargs_.values()))
                        block_in[path] = x.reshape(-1, x.shape[-1])

                    handles.append(module.register_forward_pre_hook(block_input_hook, with_kwargs=True))

                def grouped_experts(args, kwargs_, path, keys, ex):
                    if cross:
                        raise MoedslError(f"solver `{self.solver.name}` needs cross statistics, which moedsl does not "
                                          f"collect for grouped expert containers (`{path}`, `:grouped`): use gptq, "
                                          "mse or rtn for this model")
                    x_all = block_in[path]
                    if self.policy.kind in ("all", "topk"):
                        x = x_all
                        index = (router_out[path].topk(min(self.policy.top_k, ex.num_experts), dim=-1).indices
                                 if self.policy.kind == "topk" else None)
                    else:  # routed, auto: the rows of each expert, as the model routes them
                        rows, sizes = _grouped_call(args, kwargs_, ex.num_experts,
                                                    f"{path}.{ex.container(ex.first_role)}")
                        x = rows
                        index = torch.repeat_interleave(torch.arange(ex.num_experts, device=rows.device),
                                                        torch.tensor(sizes, device=rows.device))[:, None]
                    apply_experts(x, index, None, x_all, path=path, keys=keys, ex=ex)

                def apply_experts(x, index, x_fp, x_all=None, path=path, keys=keys, ex=ex, module=module):
                    """One batch's tokens at experts module `path` (index: the routing; x_fp: the full-precision
                    tokens; x_all: every token, when x holds routed rows only), applied to the owned blocks."""
                    blocks = self.owned_blocks(path)
                    if not blocks:  # every expert of this module is another rank's
                        return
                    if _stacked(ex):
                        self.add_stacked(hessians, keys, ex, module, x, router_out[path], block_in[path])
                        return
                    if self.policy.kind == "topk" and not ex.grouped:
                        index = router_out[path].topk(min(self.policy.top_k, ex.num_experts), dim=-1).indices
                    if path in all_tokens:
                        all_tokens[path].add(x if x_all is None else x_all, x_fp)
                    weights = fp_weights = None
                    if any(key.capture.kind == "experts_hidden" for key in keys):
                        weights = expert_weights.read(ex, module)
                        if x_fp is not None:
                            fp_weights = expert_weights.read(ex, get_path(self.fp_layer, ex.path))
                    for key in keys:
                        h = hessians[key.key]
                        if not key.per_expert:
                            if key.capture.kind != "experts_input":  # pragma: no cover (the compiler never plans it)
                                raise MoedslError(f"plan error: `{key.key}` reads expert outputs but is not per expert")
                            h.add(x, x_fp)
                            continue
                        for k, (e0, e1) in blocks.items():
                            sub, sub_index = _block_view(ex, index, e0, e1)
                            whole = None if index is None else (index, ex.num_experts)
                            if key.capture.kind == "experts_input":
                                self.add_experts_input(h.parts[k], key, x, sub_index, sub, x_fp, whole)
                            else:
                                fp_part = None if fp_weights is None else _experts_slice(fp_weights, e0, e1)
                                self.add_experts_hidden(h.parts[k], key, x, sub_index, sub,
                                                        _experts_slice(weights, e0, e1), self.low_experts(path, k),
                                                        x_fp, fp_part, x_all, whole)

                def experts_hook(mod, args, kwargs_, path=path, keys=keys, ex=ex, moe=moe, i=len(appliers)):
                    if ex.grouped:
                        grouped_experts(args, kwargs_, path, keys, ex)
                    elif _stacked(ex):
                        record(i, args[0], None, None)
                    else:
                        record(i, *_routing(ex, args, kwargs_), fp_now.get(path))
                    done(path)
                    dead.consider(moe, needed - fired)

                appliers.append(apply_experts)
                hooked = get_path(module, ex.container(ex.first_role)) if ex.grouped else module
                handles.append(hooked.register_forward_pre_hook(experts_hook, with_kwargs=True))
            # grouped statistics are applied as their hooks fire, so a batch run again would count twice
            dead.enabled = not grouped_any
            ranks = self.ranks
            for b, (x, kw) in enumerate(zip(inputs, kwargs)):
                src = ranks.owner(b)
                while src == ranks.rank:  # this batch's forward is ours (run again if a skip proved unsafe)
                    fired.clear()
                    calls.clear()
                    payloads.clear()
                    seen.clear()
                    dead.start_batch()
                    if cross:
                        fp_now.clear()
                        fp_now.update(self.record_fp(stage, fp_inputs[b], kw))
                    try:
                        if keep is not None:
                            keep.start(b)
                        if replay is not None:
                            self.block_runs += 1
                            replay.run(b)  # stops at the last capture, as the layer's forward would
                        else:
                            self.layer(x.to(self.device), **kw)
                    except StopForward:
                        pass
                    except SharedReadsRoutedOutput:
                        dead.enabled = False  # a shared expert reads something the routed experts feed
                        continue
                    finally:
                        payloads_keep.clear()
                        fp_now.clear()
                    missing = needed - fired
                    if missing:
                        raise MoedslError(f"stage {stage.index}: {', '.join(sorted(missing))} never ran during the "
                                          f"forward of {self.kind.layer_class}",
                                          notes=["is the module on the forward path?"])
                    break
                batch_calls, batch_payloads = calls, payloads
                if ranks.distributed:
                    batch_calls, batch_payloads = distributed.share_record(
                        ranks, (calls, payloads) if src == ranks.rank else None, src, self.device,
                        f"sharing layer {self.index}'s stage {stage.index} inputs of batch {b}")
                reference.clear()
                for i, idx in batch_calls:
                    appliers[i](*(batch_payloads[j] if j is not None else None for j in idx))
                payloads.clear()
        finally:
            for h in handles:
                h.remove()
            dead.remove()
            self.skipped_expert_calls += dead.skipped
        if keep is not None and keep.complete([b for b in range(len(inputs)) if self.ranks.owner(b) == self.ranks.rank]):
            self._kept = keep
        # policy for experts that saw too few tokens
        for path, keys in experts_keys.items():
            for key in keys:
                if key.capture.kind != "experts_input" or not key.per_expert:
                    continue
                for k, h in hessians[key.key].parts.items():
                    counts = h.count.clone()
                    self.routed_counts.setdefault(path, {})[k] = counts
                    if self.policy.kind == "auto":
                        low = (counts < self.policy.min_tokens).nonzero().flatten()
                        for e in low.tolist():
                            h.sum[e] = all_tokens[path].sum
                            h.count[e] = all_tokens[path].count
                            if cross:
                                h.cross[e] = all_tokens[path].cross
        return hessians

    def low_experts(self, path: str, block: int) -> set[int]:
        """Experts of a block (numbered within it) that `auto` tops up: they read every token."""
        counts = self.routed_counts.get(path, {}).get(block)
        if self.policy.kind != "auto" or counts is None:
            return set()
        return set((counts < self.policy.min_tokens).nonzero().flatten().tolist())

    def record_fp(self, stage: Stage, x: torch.Tensor, kw: dict) -> dict[str, torch.Tensor]:
        """One forward of the full-precision layer copy on the full-precision input x: what reaches each
        capture point of the stage (a Linear's input; the tokens an experts module reads)."""
        paths = {key.capture.path: key.capture.kind for key in stage.stats}
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for path, kind in paths.items():
            def hook(mod, args, kwargs_, path=path, kind=kind):
                if kind == "linear_input":
                    seen[path] = args[0] if args else kwargs_["input"]
                else:
                    seen[path] = _routing(_expert_bound(self.kind, path).experts, args, kwargs_)[0]
                if len(seen) == len(paths):
                    raise StopForward

            handles.append(get_path(self.fp_layer, path).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            self.fp_layer(x.to(self.device), **kw)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = set(paths) - set(seen)
        if missing:
            raise MoedslError(f"stage {stage.index}: {', '.join(sorted(missing))} never ran during the forward of "
                              f"the full-precision {self.kind.layer_class}")
        return seen

    def add_stacked(self, hessians: dict[str, Hessian], keys: list[StatsKey], ex: BoundExperts, module: nn.Module,
                    stacked: torch.Tensor, scores: torch.Tensor, x: torch.Tensor) -> None:
        """Experts that read one stacked input [E·T, H], each expert's rows scaled by its routing weight.

        routed: expert e's rows are its real inputs, x·s_e, on the tokens routed to it (s_e > 0);
        all: every expert reads every token unscaled (x), as no routing weight exists for the others.
        """
        E = ex.num_experts
        per = stacked.reshape(E, -1, stacked.shape[-1])
        if self.policy.kind == "all":
            inputs = [x] * E
        else:
            chosen = scores.reshape(-1, E) > 0
            inputs = [per[e][chosen[:, e]] for e in range(E)]
        owned = [(k, e0, e) for k, (e0, e1) in self.owned_blocks(ex.path).items() for e in range(e0, e1)]
        w = b = None
        for key in keys:
            h = hessians[key.key]
            if key.capture.kind == "experts_hidden" and w is None:
                w, b = expert_weights.read(ex, module)
            if not key.per_expert:
                if key.capture.kind == "experts_input" and inputs[0].shape[0]:
                    h.add(inputs[0])
                continue
            for k, e0, e in owned:
                xe = inputs[e]
                if xe.shape[0] == 0:
                    continue
                if key.capture.kind == "experts_input":
                    h.parts[k].add_expert(e - e0, xe)
                else:
                    we, be = expert_weights.one(w, b, e)
                    h.parts[k].add_expert(e - e0, expert_fn.hidden(xe, ex.fn, we, be)[0])

    def add_experts_input(self, h: Hessian, key: StatsKey, x: torch.Tensor, index: torch.Tensor | None,
                          ex: BoundExperts, x_fp: torch.Tensor | None = None,
                          whole: tuple[torch.Tensor, int] | None = None) -> None:
        """One block's per-expert statistics of the experts' input (ex, index: the block's own; whole: the
        routing of every expert, which sets the padding, `routed_batches`)."""
        if index is None:
            raise MoedslError(f"{ex.module_class}: routed statistics need the chosen experts (`index` in `call(...)`)")
        if not self.batched:
            order, counts, _ = _tokens_by_expert(index, ex.num_experts)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    rows = order[start:start + n]
                    h.add_expert(e, x[rows], None if x_fp is None else x_fp[rows])
                start += n
            return
        for xs, mask, counts, fps in self.routed_batches(x, index, ex.num_experts, ex.hidden_size, x_fp, whole):
            h.add_batched(xs, counts, fps)  # padding rows are zeros: they add nothing

    def add_experts_hidden(self, h: Hessian, key: StatsKey, x: torch.Tensor, index: torch.Tensor | None,
                           ex: BoundExperts, weights: tuple[dict, dict], low: set[int],
                           x_fp: torch.Tensor | None = None, fp_weights: tuple[dict, dict] | None = None,
                           x_all: torch.Tensor | None = None, whole: tuple[torch.Tensor, int] | None = None) -> None:
        """One block's down-projection inputs (ex, index, weights: the block's own; low: its experts that
        `auto` tops up); with x_fp (cross statistics) also the full-precision model's: the full-precision
        experts (`fp_weights`, `fp_layer`'s) on the full-precision tokens.
        x: the tokens (with index: the routed ones); x_all: every token, for the experts `auto` tops up
        (grouped experts pass their routed rows as x, the block's input as x_all; they take no x_fp)."""
        x_all = x if x_all is None else x_all
        w, b = weights
        fp_w = fp_weights if x_fp is not None else None

        def hidden(xs, e=None):  # the experts' hidden rows for xs, and the full-precision ones for fps
            we, be = (w, b) if e is None else expert_weights.one(w, b, e)
            return expert_fn.hidden(xs, ex.fn, we, be)

        def hidden_fp(fps, e=None):
            if fps is None:
                return None
            we, be = fp_w if e is None else expert_weights.one(*fp_w, e)
            return expert_fn.hidden(fps, ex.fn, we, be)

        def rows(t, r):
            return None if t is None else t[r]

        dtype = x.dtype
        if key.tokens == "all" and not self.batched:
            for e in range(ex.num_experts):
                fp_e = hidden_fp(x_fp, e)
                h.add_expert(e, hidden(x, e)[0], None if fp_e is None else fp_e[0])
            return
        if key.tokens == "all":
            # every expert on every token, a slice of experts at a time over chunks of TOKEN_CHUNK
            # tokens: [slice, chunk, I] values bounded by chunk_bytes (twice that with the
            # full-precision stream). Long token chunks keep the Hessian products compute-bound: each
            # product reads and writes its slice's Hessians (4·I² bytes an expert) once per chunk.
            E, T = ex.num_experts, x.shape[0]
            chunk = min(T, TOKEN_CHUNK)
            per_expert = chunk * ex.intermediate_size * 4 * 3 * (2 if x_fp is not None else 1)
            width = max(1, min(E, self.chunk_bytes // per_expert))
            for e0 in range(0, E, width):
                e1 = min(E, e0 + width)
                part = _experts_slice((w, b), e0, e1)
                fp_part = None if fp_w is None else _experts_slice(fp_w, e0, e1)
                acc = h.experts_slice(e0, e1)
                for s in range(0, T, chunk):
                    xc = x[s:s + chunk].to(dtype)
                    fpc = None if fp_part is None else expert_fn.hidden(x_fp[s:s + chunk], ex.fn, *fp_part)
                    acc.add_batched(expert_fn.hidden(xc, ex.fn, *part), xc.shape[0], fpc)
            return
        if self.batched:
            # the routed tokens of all experts, padded to one [E, n, H] batch per token chunk; an
            # expert topped up by `auto` reads every token instead, one at a time (there are few)
            keep = torch.ones(ex.num_experts, dtype=torch.bool, device=x.device)
            keep[list(low)] = False
            width = ex.intermediate_size * 3 * (2 if x_fp is not None else 1)
            for xs, mask, counts, fps in self.routed_batches(x, index, ex.num_experts, width, x_fp, whole):
                live = (mask & keep[:, None])[..., None].to(xs.dtype)
                hid_fp = hidden_fp(fps)
                h.add_batched(hidden(xs) * live, counts * keep, None if hid_fp is None else hid_fp * live)
            for e in sorted(low):
                fp_e = hidden_fp(x_fp, e)
                h.add_expert(e, hidden(x_all, e)[0], None if fp_e is None else fp_e[0])
            return
        order, counts, _ = _tokens_by_expert(index, ex.num_experts)
        start = 0
        for e, n in enumerate(counts.tolist()):
            r = slice(None) if e in low else order[start:start + n]
            start += n
            xe = x_all if e in low else x[r]
            if xe.shape[0] == 0:
                continue
            fp_e = hidden_fp(rows(x_fp, r), e)
            h.add_expert(e, hidden(xe, e)[0], None if fp_e is None else fp_e[0])

    def routed_batches(self, x: torch.Tensor, index: torch.Tensor, E: int, width: int,
                       fp: torch.Tensor | None = None, whole: tuple[torch.Tensor, int] | None = None):
        """Token chunks of routed inputs as padded batches: (xs [E, n, H], mask [E, n], counts [E], fps).

        Tokens are grouped by expert (one sort), scattered into a zero-padded [E, n, H] tensor,
        n the largest count in the chunk; chunks keep E·n·width·4 bytes under chunk_bytes. fps: the
        same rows of fp (the full-precision tokens), or None. For an expert block, whole = (the routing
        index of every expert, their number): n is then the largest count among all the experts, as
        without blocks, since the products' summation order on the CPU depends on their length n."""
        T, k = index.shape
        step = max(1, min(T, self.chunk_bytes // max(1, 4 * width * k * 4)))
        for s in range(0, T, step):
            xc, ic = x[s:s + step], index[s:s + step]
            order, counts, flat = _tokens_by_expert(ic, E)
            if not counts.numel() or int(counts.max()) == 0:
                continue
            n = int(counts.max()) if whole is None else int(_tokens_by_expert(whole[0][s:s + step], whole[1])[1].max())
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(order.numel(), device=x.device) - starts[flat]
            xs = x.new_zeros(E, n, x.shape[-1])
            xs[flat, slot] = xc[order]
            fps = None
            if fp is not None:
                fps = fp.new_zeros(E, n, fp.shape[-1])
                fps[flat, slot] = fp[s:s + step][order]
            mask = torch.zeros(E, n, dtype=torch.bool, device=x.device)
            mask[flat, slot] = True
            yield xs, mask, counts, fps
