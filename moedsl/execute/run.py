"""A whole quantization run: model in, checkpoint out, layer by layer.

1. Build the model skeleton on the meta device and load only embeddings, final norm and head.
2. Pick the definition (by model_type, or the one given), bind it and compile the hook plan.
3. Run the calibration batches up to the first decoder layer, recording every layer's call
   arguments (masks differ between layer types in hybrid models).
4. For each layer: load its weights, quantize it by its plan (`LayerQuantizer`), write its
   shard, save the next layer's inputs for resuming, unload it. A solver that asks for cross
   statistics (GPTAQ) makes the run carry a second stream, the full-precision model's inputs
   to each layer: it starts equal to the first (the embeddings are not quantized), goes through
   each layer as loaded, and is saved for resuming beside the quantized stream.
5. Copy the tensors that are not quantized, the tokenizer's and processors' files, then write the index, the report
   and, last, config.json (which marks the checkpoint complete).

The output directory (kept apart from the source, locked, resumed or cleared) is `outdir.py`'s.
Under torchrun every rank runs this same sequence; rank 0 alone holds the output directory and writes
(`distributed.py` says what the ranks share and split).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moedsl.errors import MoedslError
from moedsl.execute import distributed
from moedsl.execute.layer import LayerQuantizer, StopForward
from moedsl.execute.options import QuantizeOptions
from moedsl.execute.fingerprint import SIDE_FILES, source_fingerprint
from moedsl.execute.outdir import REPORT_NAME, RUN_DIR, STATE_NAME, OutputDir, check_apart, hold
from moedsl.execute.packer import Packer
from moedsl.execute.phases import Phases
from moedsl.execute.reader import LayerReader
from moedsl.execute.stacker import ExpertStacker
from moedsl.execute.report import Report, print_summary
from moedsl.execute.writer import FinishedLayer, HostCopier, LayerWriter, copy_shard, runtime_names
from moedsl.models import remote
from moedsl.write.files import copy_atomic, stop_point, stop_requested
from moedsl.plan.schema import HookPlan

log = logging.getLogger(__name__)

REST_SHARD = "model-rest.safetensors"  # the tensors outside the decoder layers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoedslError(f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MoedslError(f"unknown device `{name}`", expected=["auto", "cpu", "cuda", "cuda:N"]) from None


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer to record the arguments the model calls it with."""

    def __init__(self, index: int, last: int, record: dict, carry: tuple[str, ...] = (),
                 layer: torch.nn.Module | None = None):
        super().__init__()
        self.index, self.last, self.record, self.carry = index, last, record, carry
        object.__setattr__(self, "_layer", layer)  # not registered as a submodule

    def __getattr__(self, name: str):
        # a model may read its layers' attributes while it calls them (nemotron_h picks each
        # layer's mask by `layer.block_type`): answer with the real layer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.record["hidden"] = hidden_states
        self.record.setdefault("kwargs", {})[self.index] = kwargs
        if args:
            raise MoedslError("decoder layers called with positional arguments beyond the hidden states are not "
                              "supported")
        if self.index == self.last:
            raise StopForward
        if self.carry:  # the model unpacks (hidden, *carried): hand back what came in
            return (hidden_states, *(kwargs.get(name) for name in self.carry))
        return hidden_states


@torch.no_grad()
def park(model: nn.Module, layers_path: str, device: torch.device) -> list[nn.Parameter]:
    """Move every parameter on `device` outside the decoder layers to host memory (in place: modules keep
    their parameters); returns them, for `unpark`. A parameter a decoder layer also holds (a block shared
    between the model and its layers) stays where it is."""
    from moedsl.bind.binder import get_path

    prefix = layers_path + "."
    device = torch.device(device)
    in_layers = {id(p) for layer in get_path(model, layers_path) for p in layer.parameters()}
    parked = []
    for name, p in model.named_parameters():
        on_device = p.device.type == device.type and device.index in (None, p.device.index)
        if not name.startswith(prefix) and on_device and id(p) not in in_layers:
            p.data = p.data.to("cpu")
            parked.append(p)
    return parked


def unpark(parked: list[nn.Parameter], device: torch.device) -> None:
    for p in parked:
        p.data = p.data.to(device)


def capture_layer_inputs(model, plan: HookPlan, batches: list[torch.Tensor], device: torch.device,
                         act_device: torch.device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0, and every layer's keyword arguments, per batch."""
    from moedsl.bind.binder import get_path

    layers = get_path(model, plan.layers_path)
    # a composite model is calibrated on text alone, through its language model
    forward = get_path(model, plan.language_model) if plan.language_model else model
    saved = list(layers)
    n = len(saved)
    hidden, kwargs_per_layer = [], [[] for _ in range(n)]
    try:
        for b, ids in enumerate(batches):
            record: dict = {}
            for i in range(n):
                layers[i] = _Catcher(i, n - 1, record, plan.carry, saved[i])
            try:
                forward(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            hidden.append(record["hidden"].to(act_device))
            for i in range(n):
                kwargs_per_layer[i].append(record["kwargs"][i])
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer
    return hidden, kwargs_per_layer


def _to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def starved_warnings(i: int, starved: dict[str, list[int]], policy) -> list[str]:
    """What the run says of layer i's experts that saw no calibration token."""
    return [f"layer {i}: {len(experts)} expert(s) of `{path}` saw no calibration token under policy {policy} and "
            f"were rounded to nearest: {experts[:16]}{' …' if len(experts) > 16 else ''}"
            for path, experts in starved.items()]


def checkpoint_prefix(loader, plan: HookPlan, i: int) -> str:
    """Layer i's name in the checkpoint: under the definition's declared root (`layers … @ "…"`), else
    as transformers' conversion reads it (a composite's layers may sit elsewhere than at runtime)."""
    if plan.layers_ckpt_path != plan.layers_path:
        return f"{plan.layers_ckpt_path}.{i}."
    return loader.checkpoint_layer_prefix(i)


def _first_layer_guess(state: Path) -> int:
    """Where a resumed run will start (checked properly later; a wrong guess only costs a read)."""
    try:
        return int(json.loads(state.read_text())["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _warm_up(device: torch.device, group_size: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Initialize CUDA, the libraries' handles and GPTQ's block kernel for the block width this run's
    solves use. cuBLAS and cuDNN create their handles on first use and keep them in pools that later
    threads draw from, so first uses here (a matmul in the model's dtype and in fp32, an attention)
    take ~0.7 s of setup off the first layer on an H200."""
    import math

    from moedsl.gptq.block import warm_up

    try:
        a = torch.ones(64, 64, device=device, dtype=dtype)
        a @ a
        a.float() @ a.float()
        q = torch.ones(1, 2, 64, 64, device=device, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        warm_up(device, math.gcd(128, group_size) if group_size > 0 else 128)
    except Exception as exc:  # only a head start: the first use does the same (and reports a real problem)
        log.debug("warm-up failed: %s", exc)


def check_shapes(plan: HookPlan, cfg, fmt: str) -> None:
    """Pre-flight: every target's shape must suit the group size and the format's packing, checked
    before any layer is quantized or any shard written (the writer would refuse them only later)."""
    from moedsl.write.pack import group_problems, packing_problems

    bad: dict[str, str] = {}
    grouping = packing = False
    for kind in plan.kinds:
        for stage in kind.stages:
            for t in stage.targets:
                g = group_problems(t.in_features, cfg)
                p = packing_problems(t.out_features, t.in_features, cfg, fmt)
                grouping, packing = grouping or bool(g), packing or bool(p)
                if g or p:
                    bad.setdefault(f"{kind.name}: {t.id} [{t.out_features}x{t.in_features}]", "; ".join(g + p))
    if bad:
        lines = [f"{name}: {why}" for name, why in bad.items()]
        notes = []
        if grouping:
            notes.append("choose a group size that divides every in_features (or -1 for one group per row)")
        if packing:  # a group size cannot help here: say what can
            notes.append(f"no group size changes this: {cfg.bits}-bit GPTQ packs whole int32 words along both "
                         "dimensions; use --format compressed-tensors, or mark the module `:!` in the definition")
        raise MoedslError(f"{len(bad)} target(s) cannot be quantized with group_size {cfg.group_size} and "
                          f"{cfg.bits} bits in the {fmt} format:\n  " + "\n  ".join(lines[:20])
                          + (f"\n  … and {len(lines) - 20} more" if len(lines) > 20 else ""), notes=notes)


def check_engine(opts: QuantizeOptions, cfg, has_experts: bool, family: str | None = None) -> list[str]:
    """What the chosen serving engine could not load (moedsl/write/engines.py), found before any work:
    refused for `--engine vllm`, returned as warnings for `auto`. What the format cannot store is
    refused for every engine."""
    from moedsl.write.engines import engine_problems, family_problems, format_problems

    refused = format_problems(opts.format, cfg, has_experts=has_experts)
    if refused:
        raise MoedslError(f"--format {opts.format}: this checkpoint cannot be written:\n  " + "\n  ".join(refused))
    problems = engine_problems(opts.engine, opts.format, cfg, has_experts=has_experts)
    if family is not None:
        problems += family_problems(opts.engine, family, opts.format)
    if problems and opts.engine == "vllm":
        raise MoedslError(f"--engine vllm: this {opts.format} checkpoint would not load in vLLM:\n  "
                          + "\n  ".join(problems),
                          notes=["pass --engine none to write it anyway, for a loader other than vLLM "
                                 "(or leave --engine out: the run then warns instead)"])
    return [f"vLLM will not load this checkpoint: {p} (--engine vllm refuses it; --engine none does not check)"
            for p in problems]


def quantize(**kwargs) -> Report:
    """Quantize a model and write a checkpoint; keyword arguments are `QuantizeOptions` fields.

    launched: when the process started working (the CLI passes its launch time, so the report's
    `startup` includes the imports); by default the call itself."""
    launched = kwargs.pop("launched", None)
    opts = kwargs.pop("options", None) or QuantizeOptions(**kwargs)
    return Runner(opts, launched).run()


class Runner:
    def __init__(self, opts: QuantizeOptions, launched: float | None = None):
        self.launched = launched
        self.opts = opts
        self.ranks = distributed.init(opts.device)  # one rank unless torchrun started this process
        self.device = self.ranks.comm_device if self.ranks.distributed else pick_device(opts.device)
        self.policy = opts.moe_policy()
        # bad bits, group size or damping, or a combination the chosen engine cannot load, fail here,
        # before any model is loaded
        check_engine(opts, opts.quant_config(), has_experts=False)
        self.out: OutputDir | None = None
        self.reader: LayerReader | None = None
        from moedsl.solvers import resolve_solver, wants_cross

        self.solver = resolve_solver(opts.solver)  # likewise an unknown or broken solver
        self.cross = wants_cross(self.solver)  # carry the full-precision stream too (GPTAQ)

    def run(self) -> Report:
        try:
            return self._run()
        finally:
            if self.reader is not None:  # a read ahead in flight when startup failed
                self.reader.close()
            if self.out is not None:
                self.out.release()  # after a failure: the lock, and the debris of a run that finished no layer

    def _run(self) -> Report:
        from moedsl.calib.data import load_calibration
        from moedsl.execute.finite import check_finite_layer
        from moedsl.execute.model_check import open_model
        from moedsl.execute.progress import Progress
        from moedsl.lang.library import for_model, load
        from moedsl.models.default import default_model_dir
        from moedsl.plan.compiler import compile_plan
        from moedsl.write.checkpoint import CheckpointWriter, required_scale_dtype
        from moedsl.write.engines import (engine_config, gptq_checkpoint_format, gptq_prefixes, stacked_experts,
                                          writes_weightless_slots)

        opts = self.opts
        t_start = time.perf_counter()
        check_apart(opts.out, opts.model, {"--calib": opts.calib, "--def": opts.definition})
        launched = self.launched if self.launched is not None else t_start
        phases = Phases(self.device)
        phases.add("startup.imports", t_start - launched)
        warm = None
        if self.device.type == "cuda":  # CUDA context and GPTQ's Triton kernel, beside the skeleton build
            warm = threading.Thread(target=_warm_up, args=(self.device, opts.group_size), daemon=True)
            warm.start()
        model_dir = opts.model if opts.model is not None else default_model_dir()
        if not Path(model_dir).is_dir():
            raise MoedslError(f"--model {model_dir}: no such directory")
        # before the output directory is touched: a model that needs its own code, a checkpoint the loader
        # cannot read, or a config that does not fit its checkpoint, is refused here
        with phases("startup.skeleton", sync=False):
            loader, model, model_warnings = open_model(model_dir, opts, self.device)
        code = loader.remote_code
        with phases("startup.plan", sync=False):
            definition = load(opts.definition) if opts.definition else for_model(model)
            tokens = opts.samples * opts.seq_len
            plan = compile_plan(definition, model, policy=self.policy, tokens=tokens)
            distributed.check_plan(self.ranks, plan)
            loader.use_layers(model, plan.layers_path)
        # the first layer is read (and the GPU kernels compiled) while the run starts up: from here on,
        # beside the embeddings, the calibration data and its capture. A resumed run starts further on
        # (a guess, checked later; a wrong one costs only a read)
        overlap = opts.pipeline == "overlap"
        self.reader = reader = LayerReader(loader, plan.num_layers, pin=self.device.type == "cuda", overlap=overlap,
                                           phases=phases)
        reader.prefetch(_first_layer_guess(opts.out / RUN_DIR / STATE_NAME) if opts.resume else 0)
        with phases("startup.embeddings", sync=False):
            loader.load_non_layer(model, self.device, skip=plan.towers)  # towers are copied, never run
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        cfg = opts.quant_config(required_scale_dtype(opts.format, dtype))
        check_shapes(plan, cfg, opts.format)
        engine_warnings = check_engine(opts, cfg, has_experts=any(kind.moe for kind in plan.kinds),
                                       family=definition.header.name)
        stacked = stacked_experts(opts.engine, definition.header.name, opts.format)
        keep_slots = writes_weightless_slots(opts.engine)
        left_out = 0 if keep_slots else sum(len(self.slot_keys(loader, plan, i, plan.kind_for_layer(i)))
                                            for i in range(plan.num_layers))
        if left_out:
            engine_warnings.append(
                f"written for vLLM: the {left_out} tensors the source stores for weightless router slots (`extra "
                "identity/zero`: no forward reads them) are left out, since vLLM maps only the experts before them; "
                "--engine none keeps them")
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config.pop("quantization_config", None)  # the source's storage (FP8, MXFP4) was dequantized away
        config, config_added = engine_config(opts.engine, config)
        with phases("startup.calibration", sync=False):
            calib = load_calibration(opts.calib, model_dir, opts.samples, opts.seq_len, opts.seed,
                                     trust_remote_code=code is not None)
        # only once every input has been checked; rank 0 alone holds the directory
        def take_hold():
            self.out = hold(opts.out, resume=opts.resume, overwrite=opts.overwrite)
            return self.out.state is not None, self.out.notes

        ranks = self.ranks
        resuming, notes = ranks.agree(take_hold, "taking hold of the output directory")
        out = self.out  # None on the other ranks
        head_options = dict(ignore=(), extra_quantization_config={"lm_head": True} if opts.format == "gptq" else None)
        writer = CheckpointWriter(opts.out, opts.format, cfg, gptq_checkpoint_format=gptq_checkpoint_format(cfg),
                                  gptq_prefixes=gptq_prefixes(opts.engine, definition.header.name),
                                  **(head_options if opts.quantize_lm_head else {}))
        ids, warnings = (calib.input_ids, list(calib.warnings)) if hasattr(calib, "input_ids") else (calib, [])
        warnings = model_warnings + engine_warnings + warnings  # the report lists every warning, not only stderr
        report = Report.start(opts, plan, str(model_dir), definition.source_file or definition.header.name,
                              str(self.device), warnings)
        report.remote_code = code.record() if code is not None else None
        report.solver = self.solver.name
        report.config_added = config_added
        progress = Progress(enabled=opts.progress and ranks.main)
        if loader.stored_format.method:
            progress.note(f"source weights stored as {loader.stored_format.describe()}: each layer is dequantized "
                          "on the device as it loads")
        for w in warnings if ranks.main else ():  # rank 0 speaks for every rank
            progress.warn(w)
        if config_added and ranks.main:
            progress.note("config.json gets what vLLM reads and the source's lacks: " + "; ".join(config_added))
        for note in notes:
            progress.note(note)

        batches = list(ids.split(opts.batch_size))
        act_device = self.activation_device(model, tokens, progress)
        with phases("startup.capture"), remote.running(code, "running the model", only_in_code=True):
            hidden, layer_kwargs = capture_layer_inputs(model, plan, batches, self.device, act_device)
        # the embeddings and the head are not run again until --quantize-lm-head's end: in host memory
        # meanwhile, the device holds only the layer being quantized (2.3 GiB at GLM-4.5-Air's vocabulary)
        parked = park(model, plan.layers_path, self.device) if self.device.type == "cuda" else []
        start_layer = 0
        carried: list[dict] = [{} for _ in batches]  # per batch: what the last layer hands the next (`carry`)
        # the full-precision model's stream (cross statistics only): equal to the quantized one at layer 0
        fp_hidden = list(hidden) if self.cross else None
        fp_carried: list[dict] = [{} for _ in batches]
        # one block per rank unless given: in one process the whole layer's experts are one block (the largest
        # batched solves; 8 blocks cost a Qwen3-style layer ~40 % on the CPU), and N ranks get one block each
        expert_blocks = opts.expert_blocks or ranks.world
        report.options["expert_blocks"] = str(expert_blocks)  # the blocks used, as given or as chosen
        fingerprint = {"options": {**opts.fingerprint(), "expert_blocks": str(expert_blocks),
                                   "definition": definition.header.name},
                       "source": source_fingerprint(model_dir, [loader.shard_of(k) for k in loader.checkpoint_keys()],
                                                    ids, plan)}
        if code is not None:  # other code would give other results
            fingerprint["source"]["remote_code"] = code.digests()
        def begin():  # every input is checked: now clear what this run replaces, or read what it resumes
            out.begin()
            return out.resume(fingerprint)["finished"] if resuming else 0

        start_layer = ranks.agree(begin, "starting the output directory")
        if resuming:
            if ranks.main:
                state = out.state
                acts = out.load_acts(act_device)
                hidden = [acts[f"x.{b}"] for b in range(len(batches))]
                carried = [{name: acts.get(f"carry.{name}.{b}") for name in plan.carry} for b in range(len(batches))]
                if self.cross:
                    fp_hidden = [acts[f"fp.x.{b}"] for b in range(len(batches))]
                    fp_carried = [{name: acts.get(f"fp.carry.{name}.{b}") for name in plan.carry}
                                  for b in range(len(batches))]
                for i in range(start_layer):
                    writer.adopt_shard(f"layer-{i:05d}.safetensors")
                report.layers = state["layers"]
                for done in report.layers:  # the interrupted run's warnings about its finished layers
                    report.warnings += starved_warnings(done["layer"], done["starved_experts"], self.policy)
            if ranks.distributed:  # the interrupted run's layer inputs (both streams), from rank 0 to every rank
                hidden, carried = distributed.share_resumed(ranks, hidden, carried, act_device)
                if self.cross:
                    fp_hidden, fp_carried = distributed.share_resumed(ranks, fp_hidden, fp_carried, act_device)
            progress.note(f"resuming after layer {start_layer - 1}")

        packer = Packer(writer, dtype)
        layer_writer = LayerWriter(writer, loader, out.commit_layer, overlap=overlap, phases=phases) if ranks.main \
            else distributed.NO_WRITER
        to_host = HostCopier(act_device)
        if warm is not None:
            with phases("startup.kernels", sync=False):
                warm.join()
        phases.add("startup", time.perf_counter() - launched)
        last_record = time.perf_counter()  # the last resume state (--resume-interval)
        # the shard of the tensors outside the layers is written after the last layer but one (see FinishedLayer):
        # while the last layer is quantized, and late enough that the disk never holds more than at the end
        # (every shard, the last resume state and the final files); a quantized lm_head joins that shard at the
        # end, so then it is written there, as it is when this run has no layer left to do
        rest_with = None if opts.quantize_lm_head else max(start_layer, plan.num_layers - 2)
        try:
            with progress.layers(plan.num_layers, start_layer) as bar:
                for i in range(start_layer, plan.num_layers):
                    if stop_requested(f"layer:{i}:start"):  # tests: the layers before are on disk, as in serial mode
                        layer_writer.drain()
                    stop_point(f"layer:{i}:start")
                    distributed.test_fault(ranks.rank, f"layer:{i}:start")
                    kind = plan.kind_for_layer(i)
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    t0 = time.perf_counter()
                    phases_before = phases.snapshot()
                    with phases("read"):
                        layer = loader.load_layer(model, i, self.device, tensors=reader.get(i))
                    check_finite_layer(layer, kind, i, plan.layers_path)
                    kwargs = [_to({**kw, **c}, self.device) for kw, c in zip(layer_kwargs[i], carried)]
                    quantizer = LayerQuantizer(kind, layer, cfg, self.policy, self.device, solver=self.solver, index=i,
                                               ranks=ranks, expert_blocks=expert_blocks)
                    quantizer.out_device = act_device
                    quantizer.phases = phases
                    prefix = checkpoint_prefix(loader, plan, i)
                    packed: list = []
                    stacker = ExpertStacker(stacked, [m.experts.path for m in kind.moe])

                    def pack(q, prefix=prefix, packed=packed, stacker=stacker):
                        with phases("pack", sync=False):
                            for s in stacker.add(q):
                                packed.append((s.q.unit, packer.pack([prefix + c for c in s.q.ckpts], s.q.stack,
                                                                     s.q.expert, s.join, s.omit)))

                    quantizer.sink = pack
                    fp_kwargs = None
                    if self.cross:
                        fp_kwargs = [_to({**kw, **c}, self.device) for kw, c in zip(layer_kwargs[i], fp_carried)]
                    with remote.running(code, f"running decoder layer {i}", only_in_code=True):
                        result = quantizer.run(hidden, kwargs, fp_hidden, fp_kwargs)
                    stacker.finish()
                    packed = distributed.gather_packed(ranks, quantizer.units, packed, f"gathering layer {i}'s "
                                                       "quantized tensors")
                    hidden = [y.to(act_device) for y in result.outputs]
                    carried = [dict(zip(plan.carry, extra)) for extra in result.carried]
                    if self.cross:
                        fp_hidden = [y.to(act_device) for y in result.fp_outputs]
                        fp_carried = [dict(zip(plan.carry, extra)) for extra in result.fp_carried]
                    loader.unload_layer(model, i)
                    if not overlap and self.device.type == "cuda":  # step by step: give memory back at each layer
                        torch.cuda.empty_cache()
                    seconds = time.perf_counter() - t0
                    peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
                    peak = distributed.record_peaks(ranks, report, peak, f"layer {i}'s memory figures")
                    if not ranks.main:  # rank 0 reports and writes the layer
                        bar.advance(i, seconds, tokens)
                        continue
                    report.add_layer(i, kind.name, seconds, peak, result, tokens,
                                     Phases.since(phases_before, phases.snapshot()))
                    for msg in starved_warnings(i, result.starved, self.policy):
                        progress.warn(msg)
                        report.warnings.append(msg)
                    acts = acts_ready = None  # no resume state after this layer
                    if opts.resume_interval == 0 or time.perf_counter() - last_record >= opts.resume_interval:
                        last_record = time.perf_counter()
                        acts = {f"x.{b}": x for b, x in enumerate(hidden)}
                        acts |= {f"carry.{name}.{b}": v for b, c in enumerate(carried)
                                 for name, v in c.items() if torch.is_tensor(v)}
                        if self.cross:
                            acts |= {f"fp.x.{b}": x for b, x in enumerate(fp_hidden)}
                            acts |= {f"fp.carry.{name}.{b}": v for b, c in enumerate(fp_carried)
                                     for name, v in c.items() if torch.is_tensor(v)}
                        acts, acts_ready = to_host(acts)
                    names = [n for p in packed for n in p.names]
                    done = FinishedLayer(i, f"layer-{i:05d}.safetensors", packed,
                                         self.layer_copies(loader, plan, i, kind, names, keep_slots), acts,
                                         {"fingerprint": fingerprint, "layers": list(report.layers)}, acts_ready,
                                         (REST_SHARD, loader.non_layer_keys()) if i == rest_with else None)
                    with phases("write_wait", sync=False) if overlap else contextlib.nullcontext():
                        layer_writer.submit(done)
                    del packed, done, acts
                    bar.advance(i, seconds, tokens)
                with phases("write_wait", sync=False):
                    layer_writer.drain()
        finally:
            reader.close()
            layer_writer.close()

        distributed.record_host_peaks(ranks, report)
        if not ranks.main:  # the others wait for rank 0 to finish the checkpoint, and end with it
            ranks.agree(lambda: None, "waiting for rank 0 to finish the checkpoint")
            return report
        head_key = None
        if opts.quantize_lm_head:
            with phases("head"):
                unpark(parked, self.device)
                head_key = self.quantize_head(model, plan, hidden, cfg, writer, dtype, report, fp_hidden)
        if rest_with is None or rest_with >= plan.num_layers:  # not written with a layer
            with phases("rest"):
                self.write_rest(writer, loader, plan, skip={head_key} if head_key else set())
        if opts.format == "compressed-tensors":
            writer.ignore(runtime_names(loader, writer.ignored()))
        report.finish(time.perf_counter() - t_start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if code is not None:  # beside the weights, before config.json (which marks the checkpoint finished)
            code.copy_to(opts.out)
        report.phases = phases.summary(time.perf_counter() - launched)
        report.phase_peaks = phases.peaks()
        self.copy_side_files(Path(model_dir), opts.out)
        writer.finalize(config, {REPORT_NAME: report.to_json()})  # config.json last: the directory is complete
        out.finish()
        ranks.agree(lambda: None, "finishing the checkpoint")
        if opts.progress:
            print_summary(report)
        return report

    def activation_device(self, model, tokens: int, progress) -> torch.device:
        """The device when a layer's inputs and outputs fit in a quarter of its free memory, else the CPU."""
        choice = self.opts.activations
        if choice == "device" or self.device.type != "cuda":
            return self.device
        hidden = getattr(model.config.get_text_config(), "hidden_size", 0) or 0  # a composite's: its text decoder's
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        need = 2 * tokens * hidden * torch.finfo(dtype).bits // 8  # a layer's inputs and its outputs
        if self.cross:
            need *= 2  # and the full-precision model's
        free, _ = torch.cuda.mem_get_info(self.device)
        if choice == "cpu" or need > free // 4:
            progress.note(f"calibration activations ({need / 2**30:.1f} GiB per layer) kept in host memory")
            return torch.device("cpu")
        return self.device

    @staticmethod
    def layer_copies(loader, plan: HookPlan, i: int, kind, quantized: list[str],
                     keep_slots: bool = True) -> list[str]:
        """Layer i's checkpoint keys stored unchanged: all but the quantized modules' weights and
        biases (`quantized`: full module names) and the fused expert tensors (and `:grouped` container
        weights) they replace; and, unless `keep_slots`, any tensors the source stores for the weightless
        `extra` router slots (engines.writes_weightless_slots)."""
        prefix = checkpoint_prefix(loader, plan, i)
        slots = set() if keep_slots else set(Runner.slot_keys(loader, plan, i, kind))
        replaced: set[str] = set()
        for name in quantized:
            replaced |= {name + ".weight", name + ".bias"}
        for stage in kind.stages:  # a `:grouped` container's one [E, out, in] weight, written per expert
            replaced |= {prefix + t.ckpt.removesuffix(".{e}") + ".weight" for t in stage.targets if t.kind == "grouped"}
        for moe in kind.moe:
            ex = moe.experts
            if ex.ckpt_fused:
                for t in ex.tensors:
                    replaced.add(prefix + (t.ckpt or f"{ex.path}.{t.name}"))
                    if t.bias:
                        replaced.add(f"{prefix}{ex.path}.{t.bias}")
        return [k for k in loader.layer_keys(i) if k not in replaced and k not in slots]

    @staticmethod
    def slot_keys(loader, plan: HookPlan, i: int, kind) -> list[str]:
        """Layer i's checkpoint keys that belong to the weightless `extra` router slots after the experts (LongCat's
        zero experts, which transformers' save_pretrained writes as experts E..E+Z-1)."""
        from moedsl.lang.ckpt_name import expand

        prefix = checkpoint_prefix(loader, plan, i)
        modules = tuple(f"{prefix}{expand(template, e)}."
                        for moe in kind.moe if not moe.experts.ckpt_fused
                        for e in range(moe.experts.num_experts, moe.experts.num_experts + len(moe.experts.slots))
                        for template in moe.experts.ckpt.values())
        return [k for k in loader.layer_keys(i) if modules and k.startswith(modules)]

    def write_rest(self, writer, loader, plan: HookPlan, skip: set[str]) -> None:
        # a composite's towers are among these: copied as the checkpoint stores them, under its names
        copy_shard(writer, loader, REST_SHARD, [k for k in loader.non_layer_keys() if k not in skip])

    @torch.no_grad()
    def quantize_head(self, model, plan: HookPlan, hidden: list[torch.Tensor], cfg, writer, dtype, report,
                      fp_hidden: list[torch.Tensor] | None = None) -> str:
        """GPTQ of lm_head on the final norm's outputs (the last layer's outputs, normalized); fp_hidden:
        the full-precision model's last-layer outputs, for the cross term (or None)."""
        from moedsl.bind.binder import get_path
        from moedsl.execute.stats import Hessian
        from moedsl.execute.solving import output_error
        from moedsl.plan.schema import Target
        from moedsl.solvers import Problem, check_results

        if plan.lm_head is None or plan.final_norm is None:
            raise MoedslError("--quantize-lm-head: the definition names no `lm_head` or no `final_norm`")
        head = get_path(model, plan.lm_head)
        embed = get_path(model, plan.embed) if plan.embed else None
        if embed is not None and getattr(embed, "weight", None) is head.weight:
            raise MoedslError("--quantize-lm-head: lm_head shares its weight with the embeddings (tied); "
                              "quantizing it would quantize the embeddings too")
        norm = get_path(model, plan.final_norm)
        H = Hessian(head.in_features, self.device, cross=fp_hidden is not None)
        for b, x in enumerate(hidden):
            H.add(norm(x.to(self.device)), None if fp_hidden is None else norm(fp_hidden[b].to(self.device)))
        W = head.weight.detach().to(self.device, torch.float32, copy=True)
        Hf = H.finalize()
        head_target = Target(id=plan.lm_head, kind="linear", path=plan.lm_head, in_features=W.shape[1],
                             out_features=W.shape[0], ckpt=plan.lm_head, stats=plan.lm_head)
        D = H.finalize_cross()
        problem = Problem((W[None],), Hf[None], (head_target,), (), (int(H.count),), cfg, None, plan.lm_head,
                          None if D is None else D[None])
        results = self.solver.solve(problem)
        check_results(self.solver, problem, results)
        r = results[0][0]
        err, rtn = output_error(W[None], r.weight[None], Hf[None], cfg)
        report.head = {"error": float(err), "rtn_error": float(rtn),
                       "tokens": int(H.count)}
        writer.add_quantized(plan.lm_head, r, head.bias, dtype)
        return plan.lm_head + ".weight"

    @staticmethod
    def copy_side_files(src: Path, out: Path) -> None:
        for name in SIDE_FILES:
            if (src / name).is_file():
                copy_atomic(src / name, out / name)
