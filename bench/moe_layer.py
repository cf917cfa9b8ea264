"""One MoE decoder layer, quantized under the `all` policy: the fast path against the unbatched path.

Shapes (random weights, built from transformers' qwen3_moe classes):
  qwen3_30b   H=2048, I=768,  128 experts, top-8 (Qwen3-30B-A3B's MoE layer)
  glm45_air   H=4096, I=1408, 128 experts, top-8 (GLM-4.5-Air's MoE-layer shape)
  deepseek_v3 H=7168, I=2048, 256 routed experts + 1 shared, top-8, MLA attention: a real
              DeepSeek-V3 decoder layer (transformers' deepseek_v3 classes, the released config)
Calibration: `--seqs` × `--seq-len` random tokens (default 64 × 2048), 4-bit, group 128.

The timed region is the whole layer: statistics, solves, write-back and the replay that
produces the next layer's inputs. `max_abs_weight_diff` compares the fast and unbatched
paths' quantized weights on a small fp32 layer. Prints one JSON line.

    python bench/moe_layer.py                      # on CUDA
    python bench/moe_layer.py --shape glm45_air
    python bench/moe_layer.py --small --device cpu # a few seconds, for tests
    python bench/moe_layer.py --solver gptaq       # another solver (gptq, rtn, mse, gptaq, gptq-refit, gptq-cd, …)

`--solver` picks the solver as `moedsl quantize --solver` does; `--act-order` adds activation
order with static groups. A solver that asks for cross statistics (gptaq) also gets the
full-precision stream, here the same layer inputs (one layer has no quantized layer before it, so
the cross term is zero, but every cost of collecting it is paid: the layer copy, the
full-precision forwards and replay, the cross accumulation and the correction).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

try:
    from bench.flops import account
except ImportError:  # run as a script: bench/ is on the path itself
    from flops import account

SHAPES = {
    "qwen3_30b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128),
    "glm45_air": dict(hidden_size=4096, moe_intermediate_size=1408, num_experts=128, num_experts_per_tok=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128),
    "deepseek_v3": dict(model_type="deepseek_v3", first_k_dense_replace=0),  # the config class's defaults
    "small": dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type", "qwen3_moe")
    if model_type == "qwen3_moe":
        kw["intermediate_size"] = 1024
    config = AutoConfig.for_model(model_type, num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096, **kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def layer_inputs(model, plan, seqs: int, seq_len: int, batch: int, device: torch.device, seed: int = 0):
    from moedsl.execute.run import capture_layer_inputs

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (seqs, seq_len), generator=g)
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(batch)), device, device)
    return hidden, kwargs[0]


def run_path(model, plan, hidden, kwargs, batched: bool, device: torch.device, chunk_bytes: int | None = None,
             solver: str = "gptq", act_order: bool = False):
    from moedsl.execute.layer import LayerQuantizer
    from moedsl.gptq.quantizer import QuantConfig
    from moedsl.solvers import resolve_solver, wants_cross

    layer = model.model.layers[0]
    cfg = QuantConfig(bits=4, group_size=128, act_order=act_order, static_groups=act_order)
    chosen = resolve_solver(solver)
    q = LayerQuantizer(plan.kind_for_layer(0), layer, cfg, plan.policy, device, chunk_bytes=chunk_bytes,
                       batched=batched, measure_error=False, solver=chosen)
    # the run's packer turns each chunk's codes into host bytes as soon as they exist, so the device never
    # holds a layer's codes; holding them here (the quantizer's default without a sink) would add a byte per
    # weight to the peak (2 GiB at the GLM-4.5-Air shape) that no run has
    matrices = []
    q.sink = lambda quantized: matrices.append(len(quantized.ckpts))
    q.phases = PeakPhases(device)
    fp = (hidden, kwargs) if wants_cross(chosen) else (None, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = q.run(hidden, kwargs, *fp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = None
    if device.type == "cuda":  # the phases reset the peak as they start: the layer's is the largest of theirs
        peak = max([torch.cuda.max_memory_allocated(device) / 2**30] + [gib for _, gib in q.phases.peaks])
    return seconds, peak, result, {"phase_peak_gpu_gib": q.phases.peaks or None, "phase_seconds": q.phases.seconds,
                                   "matrices": sum(matrices)}


class PeakPhases:
    """The quantizer's phase timers, used here for memory: the peak GPU memory of each phase in order
    (statistics and solve of each stage, then the replay), as (phase, GiB). Each phase resets the
    device's peak as it starts."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: list[tuple[str, float]] = []
        self.seconds: list[tuple[str, float]] = []  # (statistics.S | solve.S | replay, wall seconds) in order

    @contextlib.contextmanager
    def __call__(self, name: str, sync: bool = True, peak: str | None = None):
        label = peak or name
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            # the range lets `profile` charge each kernel to its phase
            with torch.profiler.record_function(f"phase:{label}"):
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self.peaks.append((name, round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)))
            self.seconds.append((label, round(time.perf_counter() - t0, 4)))

    def add(self, name: str, seconds: float) -> None:
        pass


def profile(model, plan, hidden, kwargs, original, device: torch.device, chunk: int) -> None:
    """The layer once more under torch.profiler: the kernels that took the time, to stderr."""
    import sys

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model.model.layers[0].load_state_dict(original)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        run_path(model, plan, hidden, kwargs, True, device, chunk)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60), file=sys.stderr)
    # the same time by operator and input shapes: which call of an operator (which solve, which copy) took it
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40, max_name_column_width=40,
                                                             max_shapes_column_width=100), file=sys.stderr)
    print(phase_table(prof.events(), device.type == "cuda"), file=sys.stderr)


def phase_table(events, cuda: bool, rows: int = 12) -> str:
    """Kernel time per phase (statistics.S, solve.S, replay: `PeakPhases`' ranges), and within each phase its
    largest operators by input shapes: which stage's products, copies or solves took the device time
    (on the CPU: each operator's own CPU time)."""
    from collections import defaultdict

    def phase_of(evt) -> str:
        while evt is not None:
            if evt.name.startswith("phase:"):
                return evt.name[len("phase:"):]
            evt = evt.cpu_parent
        return "outside"

    per_phase: dict[str, float] = defaultdict(float)
    per_op: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for evt in events:
        phase = phase_of(evt)
        if cuda:
            # a kernel launched outside any operator (Triton, Gluon) is charged to the range: name it
            costs = [(k.name[:60] if evt.name.startswith("phase:") else None, k.duration) for k in evt.kernels]
        else:
            costs = [] if evt.name.startswith("phase:") else [(None, evt.self_cpu_time_total)]
        for name, us in costs:
            op = name or f"{evt.name} {evt.input_shapes}"[:110]
            per_op[phase][op][0] += us
            per_op[phase][op][1] += 1
            per_phase[phase] += us
    lines = [f"{'kernel' if cuda else 'CPU'} time per phase (ms), and its largest operators:"]
    for phase, total in per_phase.items():
        lines.append(f"{phase:<16} {total / 1e3:10.1f}")
        top = sorted(per_op[phase].items(), key=lambda kv: -kv[1][0])[:rows]
        lines += [f"    {us / 1e3:9.1f} ms {n:6d}×  {op}" for op, (us, n) in top]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_30b", choices=["qwen3_30b", "glm45_air", "deepseek_v3"])
    p.add_argument("--small", action="store_true", help="a shrunk layer and few tokens (seconds on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--no-unbatched", action="store_true", help="skip timing the unbatched path on the full shape")
    p.add_argument("--policy", default="all", help="MoE policy: all (default), routed, topk=N, auto(min_tokens=N)")
    p.add_argument("--chunk-gib", type=float, default=None,
                   help="memory bound of one solve or statistics chunk (default: the run's, half of the layer, 2-12 GiB)")
    p.add_argument("--profile", action="store_true",
                   help="run the layer once more under torch.profiler and print its top kernels (stderr)")
    p.add_argument("--solver", default="gptq", help="gptq (default), rtn, mse, gptaq, gptaq-mse, gptaq(alpha=A), "
                                                    "gptq-refit, gptaq-mse-cd(alpha=A,sweeps=N), file.py:Name "
                                                    "(docs/solvers.md)")
    p.add_argument("--act-order", action="store_true", help="activation order with static groups")
    args = p.parse_args(argv)
    solve = dict(solver=args.solver, act_order=args.act_order)

    from moedsl.lang.library import load
    from moedsl.plan.compiler import compile_plan
    from moedsl.plan.schema import Policy

    device = torch.device(args.device)
    shape = "small" if args.small else args.shape
    seqs, seq_len = (8, 128) if args.small else (args.seqs, args.seq_len)
    definition = load(SHAPES[shape].get("model_type", "qwen3_moe"))
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
                 "tokens": seqs * seq_len, "bits": 4, "group_size": 128, "policy": args.policy, "solver": args.solver,
                 "act_order": args.act_order}

    # 1. the full-size layer: fast path, then the unbatched path on the same starting weights
    model = build(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    plan = compile_plan(definition, model, policy=Policy.parse(args.policy), tokens=seqs * seq_len)
    hidden, kwargs = layer_inputs(model, plan, seqs, seq_len, args.batch, device)
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.model.layers[0].state_dict().items()}
    chunk = int(args.chunk_gib * 2**30) if args.chunk_gib else None
    # warm-up (kernels, Triton compilation, cuBLAS handles) on two batches: a full pass would double
    # the bench at 512 × 4096 tokens
    run_path(model, plan, hidden[:2], kwargs[:2], True, device, chunk, **solve)
    model.model.layers[0].load_state_dict(original)
    seconds, peak, result, memory = run_path(model, plan, hidden, kwargs, True, device, chunk, **solve)
    out["seconds_per_layer"] = round(seconds, 3)
    out["stage_seconds"] = {s.index: round(s.seconds, 3) for s in result.stages}
    out["peak_gpu_gib"] = round(peak, 2) if peak is not None else None
    out |= memory
    out["accounting"] = account(plan, result, seqs * seq_len, model.config.num_experts_per_tok, out["device"],
                                replay_seconds=seconds - sum(s.seconds for s in result.stages))
    if args.profile:
        print(json.dumps(out), flush=True)  # the figures first: a profiled run of a big layer is slow
        profile(model, plan, hidden, kwargs, original, device, chunk)
    if not args.no_unbatched:
        model.model.layers[0].load_state_dict(original)
        unbatched, *_ = run_path(model, plan, hidden, kwargs, False, device, **solve)
        out["unbatched_seconds"] = round(unbatched, 3)
        out["speedup"] = round(unbatched / seconds, 1)
    del model, hidden, kwargs, result, original
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. equality of the two paths on a small fp32 layer
    small = build("small", device, torch.float32)
    splan = compile_plan(load("qwen3_moe"), small, policy=Policy.parse(args.policy), tokens=8 * 128)
    shidden, skwargs = layer_inputs(small, splan, 8, 128, 4, device)
    twin = copy.deepcopy(small)
    run_path(small, splan, shidden, skwargs, True, device, **solve)
    run_path(twin, splan, shidden, skwargs, False, device, **solve)
    a, b = small.model.layers[0].state_dict(), twin.model.layers[0].state_dict()
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    out["max_abs_weight_diff"] = max(diffs.values())
    out["max_abs_weight_diff_param"] = max(diffs, key=diffs.get)
    # on CUDA, cuBLAS rounds differently-shaped products differently, so a code can flip by one step
    out["weights_differing"] = sum(int((a[k] != b[k]).sum()) for k in a)
    out["weights_total"] = sum(a[k].numel() for k in a)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
