"""A whole quantization run: model in, checkpoint out, layer by layer.

1. Build the model skeleton on the meta device and load only embeddings, final norm and head.
2. Pick the definition (by model_type, or the one given), bind it and compile the hook plan.
3. Run the calibration batches up to the first decoder layer, recording every layer's call
   arguments (masks differ between layer types in hybrid models).
4. For each layer: load its weights, quantize it by its plan (`LayerQuantizer`), write its
   shard, save the next layer's inputs for resuming, unload it.
5. Copy the tensors that are not quantized, write the index and configs, and a report.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moedsl.errors import MoedslError
from moedsl.execute.layer import LayerQuantizer, LayerResult, StopForward
from moedsl.execute.options import QuantizeOptions
from moedsl.execute.report import Report, print_summary
from moedsl.plan.schema import HookPlan

RUN_DIR = ".moedsl-run"  # resume state inside the output directory; removed when the run finishes
REPORT_NAME = "moedsl-report.json"


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

    def __init__(self, index: int, last: int, record: dict, carry: tuple[str, ...] = ()):
        super().__init__()
        self.index, self.last, self.record, self.carry = index, last, record, carry

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
def capture_layer_inputs(model, plan: HookPlan, batches: list[torch.Tensor], device: torch.device,
                         act_device: torch.device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0, and every layer's keyword arguments, per batch."""
    from moedsl.bind.binder import get_path

    layers = get_path(model, plan.layers_path)
    saved = list(layers)
    n = len(saved)
    hidden, kwargs_per_layer = [], [[] for _ in range(n)]
    try:
        for b, ids in enumerate(batches):
            record: dict = {}
            for i in range(n):
                layers[i] = _Catcher(i, n - 1, record, plan.carry)
            try:
                model(input_ids=ids.to(device), use_cache=False)
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


def _prepare_out(opts: QuantizeOptions) -> bool:
    """Make the output directory ready; returns whether a partial run is there to resume."""
    out = opts.out
    state = out / RUN_DIR / "state.json"
    if out.exists() and not out.is_dir():
        raise MoedslError(f"--out {out}: exists and is not a directory")
    if state.is_file():
        if opts.resume:
            return True
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        finished = (out / "config.json").is_file() and (out / REPORT_NAME).is_file()
        if finished and opts.overwrite:
            shutil.rmtree(out)
        elif finished:
            raise MoedslError(f"--out {out} already holds a finished checkpoint", notes=["pass --overwrite to replace it"])
        else:
            raise MoedslError(f"--out {out} is not empty and holds no moedsl run to resume",
                              notes=["choose an empty or new directory"])
    out.mkdir(parents=True, exist_ok=True)
    return False


def check_shapes(plan: HookPlan, cfg, fmt: str) -> None:
    from moedsl.write.pack import shape_problems

    """Pre-flight: every target's shape must suit the group size and the format's packing, checked
    before any layer is quantized or any shard written (the writer would refuse them only later)."""
    bad: dict[str, str] = {}
    for kind in plan.kinds:
        for stage in kind.stages:
            for t in stage.targets:
                why = shape_problems(t.out_features, t.in_features, cfg, fmt)
                if why:
                    bad.setdefault(f"{kind.name}: {t.id} [{t.out_features}x{t.in_features}]", "; ".join(why))
    if bad:
        lines = [f"{name}: {why}" for name, why in bad.items()]
        raise MoedslError(f"{len(bad)} target(s) cannot be quantized with group_size {cfg.group_size} and "
                          f"{cfg.bits} bits in the {fmt} format:\n  " + "\n  ".join(lines[:20])
                          + (f"\n  … and {len(lines) - 20} more" if len(lines) > 20 else ""),
                          notes=["choose a group size that divides every in_features (or -1 for one group per row)"])


def quantize(**kwargs) -> Report:
    """Quantize a model and write a checkpoint; keyword arguments are `QuantizeOptions` fields."""
    opts = kwargs.pop("options", None) or QuantizeOptions(**kwargs)
    return Runner(opts).run()


class Runner:
    def __init__(self, opts: QuantizeOptions):
        self.opts = opts
        self.device = pick_device(opts.device)
        self.policy = opts.moe_policy()
        opts.quant_config()  # bad bits, group size or damping fail here, before any model is loaded
        from moedsl.solvers import resolve_solver

        self.solver = resolve_solver(opts.solver)  # likewise an unknown or broken solver

    def run(self) -> Report:
        from moedsl.calib.data import load_calibration
        from moedsl.execute.loader import LayerwiseLoader
        from moedsl.execute.progress import Progress
        from moedsl.lang.library import for_model, load
        from moedsl.models.default import default_model_dir
        from moedsl.plan.compiler import compile_plan
        from moedsl.write.checkpoint import CheckpointWriter, required_scale_dtype

        opts = self.opts
        t_start = time.perf_counter()
        model_dir = opts.model if opts.model is not None else default_model_dir()
        if not Path(model_dir).is_dir():
            raise MoedslError(f"--model {model_dir}: no such directory")
        resuming = _prepare_out(opts)
        loader = LayerwiseLoader(model_dir)
        model = loader.skeleton()
        model.eval()
        loader.load_non_layer(model, self.device)
        definition = load(opts.definition) if opts.definition else for_model(model)
        tokens = opts.samples * opts.seq_len
        plan = compile_plan(definition, model, policy=self.policy, tokens=tokens)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        cfg = opts.quant_config(required_scale_dtype(opts.format, dtype))
        check_shapes(plan, cfg, opts.format)
        head_options = dict(ignore=(), extra_quantization_config={"lm_head": True} if opts.format == "gptq" else None)
        writer = CheckpointWriter(opts.out, opts.format, cfg, **(head_options if opts.quantize_lm_head else {}))
        calib = load_calibration(opts.calib, model_dir, opts.samples, opts.seq_len, opts.seed)
        ids, warnings = (calib.input_ids, list(calib.warnings)) if hasattr(calib, "input_ids") else (calib, [])
        report = Report.start(opts, plan, str(model_dir), definition.source_file or definition.header.name,
                              str(self.device), warnings)
        report.solver = self.solver.name
        progress = Progress(enabled=opts.progress)
        for w in warnings:
            progress.warn(w)

        batches = list(ids.split(opts.batch_size))
        act_device = self.activation_device(model, tokens, progress)
        hidden, layer_kwargs = capture_layer_inputs(model, plan, batches, self.device, act_device)
        run_dir = opts.out / RUN_DIR
        run_dir.mkdir(exist_ok=True)
        start_layer = 0
        carried: list[dict] = [{} for _ in batches]  # per batch: what the last layer hands the next (`carry`)
        fingerprint = {**opts.fingerprint(), "definition": definition.header.name}
        if resuming:
            state = json.loads((run_dir / "state.json").read_text())
            if state["fingerprint"] != fingerprint:
                raise MoedslError(f"--out {opts.out} holds an interrupted run with other options",
                                  notes=["pass --no-resume to start over, or repeat the earlier options"])
            start_layer = state["finished"]
            acts = load_file(str(run_dir / "acts.safetensors"), device=str(act_device))
            hidden = [acts[f"x.{b}"] for b in range(len(batches))]
            carried = [{name: acts.get(f"carry.{name}.{b}") for name in plan.carry} for b in range(len(batches))]
            for i in range(start_layer):
                writer.adopt_shard(f"layer-{i:05d}.safetensors")
            report.layers = state["layers"]
            progress.note(f"resuming after layer {start_layer - 1}")

        with progress.layers(plan.num_layers, start_layer) as bar:
            for i in range(start_layer, plan.num_layers):
                kind = plan.kind_for_layer(i)
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                layer = loader.load_layer(model, i, self.device)
                kwargs = [_to({**kw, **c}, self.device) for kw, c in zip(layer_kwargs[i], carried)]
                quantizer = LayerQuantizer(kind, layer, cfg, self.policy, self.device, solver=self.solver, index=i)
                quantizer.out_device = act_device
                result = quantizer.run(hidden, kwargs)
                self.write_layer(writer, loader, plan, i, kind, result, dtype)
                hidden = [y.to(act_device) for y in result.outputs]
                carried = [dict(zip(plan.carry, extra)) for extra in result.carried]
                loader.unload_layer(model, i)
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
                report.add_layer(i, kind.name, seconds, peak, result, tokens)
                for path, experts in result.starved.items():
                    progress.warn(f"layer {i}: {len(experts)} expert(s) of `{path}` saw no calibration token under "
                                  f"policy {self.policy} and were rounded to nearest: {experts[:16]}"
                                  f"{' …' if len(experts) > 16 else ''}")
                acts = {f"x.{b}": x.contiguous().cpu() for b, x in enumerate(hidden)}
                acts |= {f"carry.{name}.{b}": v.contiguous().cpu() for b, c in enumerate(carried)
                         for name, v in c.items() if torch.is_tensor(v)}
                save_file(acts, str(run_dir / "acts.safetensors.tmp"))
                os.replace(run_dir / "acts.safetensors.tmp", run_dir / "acts.safetensors")
                (run_dir / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "finished": i + 1,
                                                                "layers": report.layers}))
                bar.advance(i, seconds, tokens)
                if os.environ.get("MOEDSL_KILL_AFTER_LAYER") == str(i):  # tests: die here, as a killed run would
                    os._exit(137)

        head_key = None
        if opts.quantize_lm_head:
            head_key = self.quantize_head(model, plan, hidden, cfg, writer, dtype, report)
        self.write_rest(writer, loader, plan, skip={head_key} if head_key else set())
        config = json.loads((Path(model_dir) / "config.json").read_text())
        report.finish(time.perf_counter() - t_start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        writer.finalize(config)
        self.copy_tokenizer(Path(model_dir), opts.out)
        (opts.out / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
        shutil.rmtree(run_dir, ignore_errors=True)
        if opts.progress:
            print_summary(report)
        return report

    def activation_device(self, model, tokens: int, progress) -> torch.device:
        """The device when a layer's inputs and outputs fit in a quarter of its free memory, else the CPU."""
        choice = self.opts.activations
        if choice == "device" or self.device.type != "cuda":
            return self.device
        hidden = getattr(model.config, "hidden_size", 0) or 0
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        need = 2 * tokens * hidden * torch.finfo(dtype).bits // 8  # a layer's inputs and its outputs
        free, _ = torch.cuda.mem_get_info(self.device)
        if choice == "cpu" or need > free // 4:
            progress.note(f"calibration activations ({need / 2**30:.1f} GiB per layer) kept in host memory")
            return torch.device("cpu")
        return self.device

    def write_layer(self, writer, loader, plan: HookPlan, i: int, kind, result: LayerResult, dtype) -> None:
        prefix = f"{plan.layers_path}.{i}."
        replaced: set[str] = set()
        for q in result.quantized:
            name = prefix + q.ckpt
            writer.add_quantized(name, q.result, q.bias, dtype, expert=q.expert)
            replaced |= {name + ".weight", name + ".bias"}
        for moe in kind.moe:
            ex = moe.experts
            if ex.ckpt_fused:
                for t in ex.tensors:
                    replaced.add(prefix + (t.ckpt or f"{ex.path}.{t.name}"))
                    if t.bias:
                        replaced.add(f"{prefix}{ex.path}.{t.bias}")
        self.copy_keys(writer, loader, [k for k in loader.layer_keys(i) if k not in replaced])
        writer.flush_shard(f"layer-{i:05d}.safetensors")

    def write_rest(self, writer, loader, plan: HookPlan, skip: set[str]) -> None:
        self.copy_keys(writer, loader, [k for k in loader.non_layer_keys() if k not in skip])
        writer.flush_shard("model-rest.safetensors")

    @torch.no_grad()
    def quantize_head(self, model, plan: HookPlan, hidden: list[torch.Tensor], cfg, writer, dtype, report) -> str:
        """GPTQ of lm_head on the final norm's outputs (the last layer's outputs, normalized)."""
        from moedsl.bind.binder import get_path
        from moedsl.execute.stats import Hessian
        from moedsl.execute.layer import output_error
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
        H = Hessian(head.in_features, self.device)
        for x in hidden:
            H.add(norm(x.to(self.device)))
        W = head.weight.detach().to(self.device, torch.float32, copy=True)
        Hf = H.finalize()
        head_target = Target(id=plan.lm_head, kind="linear", path=plan.lm_head, in_features=W.shape[1],
                             out_features=W.shape[0], ckpt=plan.lm_head, stats=plan.lm_head)
        problem = Problem((W[None],), Hf[None], (head_target,), (), (int(H.count),), cfg, None, plan.lm_head)
        results = self.solver.solve(problem)
        check_results(self.solver, problem, results)
        r = results[0][0]
        err, rtn = output_error(W[None], r.weight[None], Hf[None], cfg)
        report.head = {"error": float(err), "rtn_error": float(rtn),
                       "tokens": int(H.count)}
        writer.add_quantized(plan.lm_head, r, head.bias, dtype)
        return plan.lm_head + ".weight"

    @staticmethod
    def copy_keys(writer, loader, keys: list[str]) -> None:
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(loader.shard_of(k), []).append(k)
        for shard, ks in sorted(by_shard.items()):
            with safe_open(str(shard), "pt") as fh:
                for k in ks:
                    writer.add_tensor(k, fh.get_tensor(k))

    @staticmethod
    def copy_tokenizer(src: Path, out: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                     "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
