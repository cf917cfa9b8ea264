"""Quantizing one decoder layer by its plan: stages in order, then a replay with native routing.

For each stage: one forward of the layer over the calibration batches with hooks at the
stage's capture points, stopped as soon as every capture has fired; then GPTQ for the
stage's targets, grouped by statistics key; then the quantized weights are written back,
so later stages (and the next layer) see quantized upstream weights.

Experts never get per-expert hooks. One hook on the experts module sees the tokens and the
routing; the gate/up statistics are XᵀX (one for all experts under `all`, per expert
otherwise), and the down-projection statistics come from the declared expert function
evaluated for all experts at once with batched matmuls, in token chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.bind.bound import BoundExperts, BoundMoe
from moedsl.errors import MoedslError
from moedsl.execute.stats import Hessian
from moedsl.experts import fn as expert_fn
from moedsl.experts import weights as expert_weights
from moedsl.gptq.quantizer import QuantConfig, QuantResult, rtn_quantize
from moedsl.plan.schema import KindPlan, Policy, Stage, StatsKey, Target
from moedsl.solvers import Problem, Solver, check_results


class StopForward(Exception):
    """Raised by a hook once a stage has seen every input it needs."""


@dataclass
class Quantized:
    """One quantized matrix ready for the writer."""

    ckpt: str  # relative to the layer
    result: QuantResult
    bias: torch.Tensor | None
    expert: bool


@dataclass
class TargetReport:
    id: str
    stage: int
    matrices: int
    loss: float  # GPTQ objective, summed over matrices
    error: float  # mean squared output error tr(ΔW H ΔWᵀ)/2, summed over matrices
    rtn_error: float  # the same for round-to-nearest at the same bits and group size
    tokens: list[int]  # tokens seen (per expert for expert targets)
    no_tokens: list[int] = field(default_factory=list)  # experts that saw no calibration token
    seconds: float = 0.0


@dataclass
class StageReport:
    index: int
    seconds: float
    error: float
    rtn_error: float
    targets: list[TargetReport]


@dataclass
class LayerResult:
    quantized: list[Quantized]
    stages: list[StageReport]
    outputs: list[torch.Tensor]
    carried: list[tuple]  # per batch: the layer's extra outputs, for the next layer (`carry`)
    starved: dict[str, list[int]]  # experts path -> experts that saw no token (after the policy)


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


def _tokens_by_expert(index: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids sorted by expert, tokens per expert, the expert of each sorted row)."""
    T, k = index.shape
    flat = index.reshape(-1)
    tokens = torch.arange(T, device=index.device).repeat_interleave(k)
    order = torch.argsort(flat, stable=True)
    return tokens[order], torch.bincount(flat, minlength=E), flat[order]


class LayerQuantizer:
    def __init__(self, kind: KindPlan, layer: nn.Module, cfg: QuantConfig, policy: Policy, device: torch.device,
                 chunk_bytes: int = 1 << 30, batched: bool = True, measure_error: bool = True,
                 solver: Solver | None = None, index: int | None = None):
        """batched=False is the reference path: one expert at a time, one solve per matrix.
        solver: what quantizes each target (moedsl/solvers; GPTQ by default); index: the layer, for messages."""
        from moedsl.solvers.gptq import GPTQ

        self.solver = solver if solver is not None else GPTQ()
        self.index = index
        self.batched = batched
        self.measure_error = measure_error
        self.stop_early = True  # stop each stage's forward once its captures fired (tests turn it off)
        self.out_device = device  # where the replay leaves the next layer's inputs (the CPU when they don't fit)
        self.kind = kind
        self.layer = layer
        self.cfg = cfg
        self.policy = policy
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.routed_counts: dict[str, torch.Tensor] = {}  # experts path -> tokens per expert (gate/up stage)
        self.starved: dict[str, list[int]] = {}

    # -- the whole layer ---------------------------------------------------------------------

    def run(self, inputs: list[torch.Tensor], kwargs: list[dict]) -> LayerResult:
        quantized: list[Quantized] = []
        stages = []
        for stage in self.kind.stages:
            t0 = time.perf_counter()
            hessians = self.collect(stage, inputs, kwargs)
            reports = self.solve(stage, hessians, quantized)
            seconds = time.perf_counter() - t0
            stages.append(StageReport(stage.index, seconds, sum(r.error for r in reports),
                                      sum(r.rtn_error for r in reports), reports))
        outputs, carried = self.replay(inputs, kwargs)
        return LayerResult(quantized, stages, outputs, carried, self.starved)

    @torch.no_grad()
    def replay(self, inputs: list[torch.Tensor], kwargs: list[dict]) -> tuple[list[torch.Tensor], list[tuple]]:
        """The quantized layer with native routing: next layer's inputs, and any extra outputs it carries."""
        outs, carried = [], []
        for x, kw in zip(inputs, kwargs):
            y = self.layer(x.to(self.device), **kw)
            outs.append((y[0] if isinstance(y, tuple) else y).to(self.out_device))
            carried.append(tuple(y[1:]) if isinstance(y, tuple) else ())
        return outs, carried

    # -- statistics --------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, stage: Stage, inputs: list[torch.Tensor], kwargs: list[dict]) -> dict[str, Hessian]:
        hessians: dict[str, Hessian] = {}
        for key in stage.stats:
            hessians[key.key] = Hessian(key.features, self.device, key.experts if key.per_expert else None)
        handles = []
        needed: set[str] = set()
        fired: set[str] = set()
        reference: dict[str, torch.Tensor] = {}

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

                def hook(mod, args, kwargs_, path=path, key=key):
                    x = args[0] if args else kwargs_["input"]
                    if path == key.capture.path:
                        hessians[key.key].add(x)
                        reference[key.key] = x
                    else:
                        ref = reference.get(key.key)
                        if ref is not None and x is not ref and not (x.shape == ref.shape and torch.equal(x, ref)):
                            raise MoedslError(
                                f"plan error: `{path}` and `{key.capture.path}` share statistics `{key.key}` but read "
                                f"different inputs in {self.kind.layer_class}", notes=[
                                    "give them different stage numbers in the definition"])
                    done(path)

                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        # Experts: one hook per experts module, for its gate/up and down statistics
        experts_keys: dict[str, list[StatsKey]] = {}
        for key in stage.stats:
            if key.capture.kind in ("experts_input", "experts_hidden"):
                experts_keys.setdefault(key.capture.path, []).append(key)
        all_tokens: dict[str, Hessian] = {}
        router_out: dict[str, torch.Tensor] = {}
        block_in: dict[str, torch.Tensor] = {}
        for path, keys in experts_keys.items():
            moe = _expert_bound(self.kind, path)
            ex = moe.experts
            module = get_path(self.layer, path)
            needed.add(path)
            if self.policy.kind == "auto" and any(k.capture.kind == "experts_input" and k.per_expert for k in keys):
                all_tokens[path] = Hessian(ex.hidden_size, self.device)
            if _stacked(ex):
                if self.policy.kind not in ("routed", "all"):
                    raise MoedslError(f"policy {self.policy} is not supported for `{path}`, whose routing weights scale "
                                      "the experts' input (`scale input`): use `routed` or `all`")
                if moe.router is None:
                    raise MoedslError(f"`{path}` takes a stacked, router-scaled input: the definition must name the "
                                      f"router of `{moe.path}` (`:router`)")

                def block_hook(mod, args, kwargs_, path=path):
                    x = args[0] if args else kwargs_["hidden_states"]
                    block_in[path] = x.reshape(-1, x.shape[-1])

                def scores_hook(mod, args, output, path=path, E=ex.num_experts):
                    outs = output if isinstance(output, tuple) else (output,)
                    router_out[path] = next(o for o in outs if torch.is_tensor(o) and o.shape[-1] == E).reshape(-1, E)

                handles.append(get_path(self.layer, moe.path).register_forward_pre_hook(block_hook, with_kwargs=True))
                handles.append(get_path(self.layer, moe.router).register_forward_hook(scores_hook))
            if self.policy.kind == "topk":
                if moe.router is None:
                    raise MoedslError(f"policy {self.policy} needs the router of `{moe.path}`, which the definition does "
                                      "not name (`:router`)")
                router = get_path(self.layer, moe.router)

                def router_hook(mod, args, output, path=path, E=ex.num_experts):
                    outs = output if isinstance(output, tuple) else (output,)
                    scores = next((o for o in outs if torch.is_tensor(o) and o.shape[-1] == E and o.is_floating_point()),
                                  None)
                    if scores is None:
                        raise MoedslError(f"policy {self.policy}: the router of `{path}` returned no [T, {E}] scores")
                    router_out[path] = scores.reshape(-1, E)

                handles.append(router.register_forward_hook(router_hook))

            def experts_hook(mod, args, kwargs_, path=path, keys=keys, ex=ex):
                if _stacked(ex):
                    self.add_stacked(hessians, keys, ex, mod, args[0], router_out[path], block_in[path])
                    done(path)
                    return
                x, index = _routing(ex, args, kwargs_)
                if self.policy.kind == "topk":
                    index = router_out[path].topk(min(self.policy.top_k, ex.num_experts), dim=-1).indices
                for key in keys:
                    if key.capture.kind == "experts_input":
                        self.add_experts_input(hessians[key.key], key, x, index, ex, all_tokens.get(path))
                    else:
                        self.add_experts_hidden(hessians[key.key], key, x, index, ex, mod)
                done(path)

            handles.append(module.register_forward_pre_hook(experts_hook, with_kwargs=True))
        try:
            for x, kw in zip(inputs, kwargs):
                fired.clear()
                reference.clear()
                try:
                    self.layer(x.to(self.device), **kw)
                except StopForward:
                    pass
                missing = needed - fired
                if missing:
                    raise MoedslError(f"stage {stage.index}: {', '.join(sorted(missing))} never ran during the forward "
                                      f"of {self.kind.layer_class}", notes=["is the module on the forward path?"])
        finally:
            for h in handles:
                h.remove()
        # policy for experts that saw too few tokens
        for path, keys in experts_keys.items():
            for key in keys:
                if key.capture.kind != "experts_input" or not key.per_expert:
                    continue
                h = hessians[key.key]
                counts = h.count.clone()
                self.routed_counts[path] = counts
                if self.policy.kind == "auto":
                    low = (counts < self.policy.min_tokens).nonzero().flatten()
                    for e in low.tolist():
                        h.sum[e] = all_tokens[path].sum
                        h.count[e] = all_tokens[path].count
        return hessians

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
        w = b = None
        for key in keys:
            h = hessians[key.key]
            if key.capture.kind == "experts_hidden" and w is None:
                w, b = expert_weights.read(ex, module)
            for e, xe in enumerate(inputs):
                if xe.shape[0] == 0:
                    continue
                if key.capture.kind == "experts_input":
                    if key.per_expert:
                        h.add_expert(e, xe)
                    elif e == 0:
                        h.add(xe)
                else:
                    we, be = expert_weights.one(w, b, e)
                    h.add_expert(e, expert_fn.hidden(xe, ex.fn, we, be)[0])

    def add_experts_input(self, h: Hessian, key: StatsKey, x: torch.Tensor, index: torch.Tensor | None,
                          ex: BoundExperts, all_tokens: Hessian | None) -> None:
        if not key.per_expert:
            h.add(x)
            return
        if index is None:
            raise MoedslError(f"{ex.module_class}: routed statistics need the chosen experts (`index` in `call(...)`)")
        if all_tokens is not None:
            all_tokens.add(x)
        if not self.batched:
            order, counts, _ = _tokens_by_expert(index, ex.num_experts)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    h.add_expert(e, x[order[start:start + n]])
                start += n
            return
        for xs, mask, counts in self.routed_batches(x, index, ex.num_experts, ex.hidden_size):
            h.add_batched(xs, counts)  # padding rows are zeros: they add nothing

    def add_experts_hidden(self, h: Hessian, key: StatsKey, x: torch.Tensor, index: torch.Tensor | None,
                           ex: BoundExperts, module: nn.Module) -> None:
        w, b = expert_weights.read(ex, module)
        dtype = x.dtype
        if key.tokens == "all" and not self.batched:
            for e in range(ex.num_experts):
                we, be = expert_weights.one(w, b, e)
                h.add_expert(e, expert_fn.hidden(x, ex.fn, we, be)[0])
            return
        if key.tokens == "all":
            # every expert on every token: [E, chunk, I] at a time, bounded by chunk_bytes
            per_token = ex.num_experts * ex.intermediate_size * 4 * 3
            chunk = max(1, min(x.shape[0], self.chunk_bytes // per_token))
            for s in range(0, x.shape[0], chunk):
                xc = x[s:s + chunk].to(dtype)
                hid = expert_fn.hidden(xc, ex.fn, w, b)
                h.add_batched(hid, xc.shape[0])
            return
        counts_before = self.routed_counts.get(ex.path)
        low = set()
        if self.policy.kind == "auto" and counts_before is not None:
            low = set((counts_before < self.policy.min_tokens).nonzero().flatten().tolist())
        if self.batched:
            # the routed tokens of all experts, padded to one [E, n, H] batch per token chunk; an
            # expert topped up by `auto` reads every token instead, one at a time (there are few)
            keep = torch.ones(ex.num_experts, dtype=torch.bool, device=x.device)
            keep[list(low)] = False
            for xs, mask, counts in self.routed_batches(x, index, ex.num_experts, ex.intermediate_size * 3):
                hid = expert_fn.hidden(xs, ex.fn, w, b) * (mask & keep[:, None])[..., None].to(xs.dtype)
                h.add_batched(hid, counts * keep)
            for e in sorted(low):
                we, be = expert_weights.one(w, b, e)
                h.add_expert(e, expert_fn.hidden(x, ex.fn, we, be)[0])
            return
        order, counts, _ = _tokens_by_expert(index, ex.num_experts)
        start = 0
        for e, n in enumerate(counts.tolist()):
            xe = x if e in low else x[order[start:start + n]]
            start += n
            if xe.shape[0] == 0:
                continue
            we, be = expert_weights.one(w, b, e)
            h.add_expert(e, expert_fn.hidden(xe, ex.fn, we, be)[0])

    def routed_batches(self, x: torch.Tensor, index: torch.Tensor, E: int, width: int):
        """Token chunks of routed inputs as padded batches: (xs [E, n, H], mask [E, n], counts [E]).

        Tokens are grouped by expert (one sort), scattered into a zero-padded [E, n, H] tensor,
        n the largest count in the chunk; chunks keep E·n·width·4 bytes under chunk_bytes."""
        T, k = index.shape
        step = max(1, min(T, self.chunk_bytes // max(1, 4 * width * k * 4)))
        for s in range(0, T, step):
            xc, ic = x[s:s + step], index[s:s + step]
            order, counts, flat = _tokens_by_expert(ic, E)
            n = int(counts.max()) if counts.numel() else 0
            if n == 0:
                continue
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(order.numel(), device=x.device) - starts[flat]
            xs = x.new_zeros(E, n, x.shape[-1])
            xs[flat, slot] = xc[order]
            mask = torch.zeros(E, n, dtype=torch.bool, device=x.device)
            mask[flat, slot] = True
            yield xs, mask, counts

    # -- solving -----------------------------------------------------------------------------

    @torch.no_grad()
    def solve(self, stage: Stage, hessians: dict[str, Hessian], out: list[Quantized]) -> list[TargetReport]:
        reports: list[TargetReport] = []
        groups: dict[str, list[Target]] = {}
        for t in stage.targets:
            groups.setdefault(t.stats, []).append(t)
        by_key = {k.key: k for k in stage.stats}
        for key_name, targets in groups.items():
            t0 = time.perf_counter()
            key = by_key[key_name]
            hess = hessians[key_name]
            H = hess.finalize()
            if targets[0].kind == "linear":
                reports += self.solve_linears(stage, targets, H, int(hess.count), out)
            else:
                reports += self.solve_experts(stage, targets, key, H, hess.count, out)
            spent = time.perf_counter() - t0
            for r in reports[-len(targets):]:
                r.seconds = spent / len(targets)
        return reports

    def solve_linears(self, stage: Stage, targets: list[Target], H: torch.Tensor, tokens: int,
                      out: list[Quantized]) -> list[TargetReport]:
        modules = [get_path(self.layer, t.path) for t in targets]
        Ws = [m.weight.detach().to(self.device, torch.float32, copy=True) for m in modules]
        problem = Problem(tuple(W[None] for W in Ws), H[None], tuple(targets), (), (tokens,), self.cfg,
                          self.index, self._where(targets))
        results = [r[0] for r in self._solve(problem)]
        reports = []
        for t, m, W, r in zip(targets, modules, Ws, results):
            m.weight.data.copy_(r.weight.to(m.weight.dtype))
            err, rtn = (output_error(W[None], r.weight[None], H, self.cfg) if self.measure_error
                        else (torch.zeros(1), torch.zeros(1)))
            reports.append(TargetReport(t.id, stage.index, 1, r.loss, float(err.sum()), float(rtn.sum()), [tokens]))
            out.append(Quantized(t.ckpt, _slim(r), m.bias.detach().cpu() if m.bias is not None else None, False))
        return reports

    def solve_experts(self, stage: Stage, targets: list[Target], key: StatsKey, H: torch.Tensor, counts: torch.Tensor,
                      out: list[Quantized]) -> list[TargetReport]:
        """One role per target, all experts. Experts are taken in chunks (fp32 copies of all of them at
        once would be the peak of the layer): under `all` a chunk's gate and up rows are one tall matrix
        against the one shared Hessian; otherwise each expert has its Hessian and the chunk is one
        batched solve. The unbatched reference path solves one matrix at a time."""
        first = targets[0]
        ex = _expert_bound(self.kind, first.path if first.kind == "fused" else _experts_path(first)).experts
        module = get_path(self.layer, ex.path)
        w, b = expert_weights.read(ex, module)
        E, cols = ex.num_experts, w[first.role].shape[2]
        no_tokens: list[int] = []
        if key.per_expert:
            starved = counts == 0
            no_tokens = starved.nonzero().flatten().tolist()
            if no_tokens:
                # an expert that saw no token has no statistics: an identity Hessian makes GPTQ round to nearest
                H = torch.where(starved[:, None, None], torch.eye(cols, device=H.device), H)
                self.starved[ex.path] = sorted(set(self.starved.get(ex.path, [])) | set(no_tokens))
        rows = sum(w[t.role].shape[1] for t in targets)
        step = max(1, min(E, self.chunk_bytes // (rows * cols * 4 * 8))) if self.batched else 1
        acc = {t.id: [0.0, 0.0, 0.0] for t in targets}  # loss, error, RTN error
        for e0 in range(0, E, step):
            e1 = min(E, e0 + step)
            Wc = [w[t.role][e0:e1].detach().to(self.device, torch.float32, copy=True) for t in targets]
            Hc = H[e0:e1] if key.per_expert else H[None]
            tokens = tuple(counts[e0:e1].tolist()) if key.per_expert else (int(counts),)
            results = self.solve_chunk(Problem(tuple(Wc), Hc, tuple(targets), tuple(range(e0, e1)), tokens, self.cfg,
                                               self.index, self._where(targets)))  # [target][expert in chunk]
            for t, W, res in zip(targets, Wc, results):
                Q = torch.stack([r.weight for r in res])
                expert_weights.write(ex, module, t.role, Q, slice(e0, e1))
                if self.measure_error:
                    err, rtn = output_error(W, Q, Hc, self.cfg)
                    acc[t.id][1] += float(err.sum())
                    acc[t.id][2] += float(rtn.sum())
                acc[t.id][0] += sum(r.loss for r in res)
                bias = b.get(t.role)
                for e, r in zip(range(e0, e1), res):
                    out.append(Quantized(t.ckpt.format(e=e), _slim(r),
                                         bias[e].detach().cpu() if bias is not None else None, True))
            del Wc, results
        tokens = counts.tolist() if key.per_expert else [int(counts)] * E
        return [TargetReport(t.id, stage.index, E, acc[t.id][0], acc[t.id][1], acc[t.id][2], tokens, no_tokens)
                for t in targets]

    def solve_chunk(self, problem: Problem) -> list[list[QuantResult]]:
        if self.batched or problem.n == 1:
            return self._solve(problem)
        # the reference path: one matrix at a time
        parts = [self._solve(Problem(tuple(W[i:i + 1] for W in problem.weights),
                                     problem.hessian[i:i + 1] if not problem.shared else problem.hessian,
                                     problem.targets, problem.experts[i:i + 1],
                                     problem.tokens[i:i + 1] if not problem.shared else problem.tokens,
                                     problem.cfg, problem.layer, problem.where))
                 for i in range(problem.n)]
        return [[part[j][0] for part in parts] for j in range(len(problem.weights))]

    def _solve(self, problem: Problem) -> list[list[QuantResult]]:
        results = self.solver.solve(problem)
        check_results(self.solver, problem, results)
        return results

    def _where(self, targets: list[Target]) -> str:
        names = ", ".join(t.id for t in targets)
        return f"layer {self.index} {names}" if self.index is not None else names


def _experts_path(t: Target) -> str:
    return t.path.split(".{e}.")[0]


def _slim(r: QuantResult) -> QuantResult:
    """What the writer needs, on the CPU: the dense weight is already in the model and is not kept."""
    return QuantResult(weight=torch.empty(0), codes=r.codes.detach().cpu(), scales=r.scales.detach().cpu(),
                       zeros=r.zeros.detach().cpu(), g_idx=r.g_idx.detach().cpu(), loss=r.loss, damp=r.damp)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared output error per matrix, tr(ΔW H ΔWᵀ)/2 (H = 2/n Σxxᵀ), for GPTQ's Q and for RTN.

    W, Q [n, out, in]; H [n or 1, in, in]. RTN is row-wise, so all n matrices are one call."""
    rtn = rtn_quantize(W.reshape(-1, W.shape[-1]), cfg).weight.reshape(W.shape)
    out = []
    for Qx in (Q, rtn):
        d = (W - Qx.to(W.device)).float()
        out.append(((d @ H) * d).sum(dim=(1, 2)) / 2)
    return out[0], out[1]
