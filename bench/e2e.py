"""A whole model end to end: build a checkpoint of a real MoE shape, quantize it as a user would.

1. Builds a transformers model directory of the given shape with N decoder layers: config.json
   from the model type's own config class (`AutoConfig.for_model`, full widths), random bf16
   weights written straight to safetensors shards under the checkpoint's on-disk names (those
   `from_pretrained` reads: transformers' own conversion mapping, reversed, gives them), and an
   index. Nothing is materialized as a whole model, so a 23 GB DeepSeek-V3 layer costs its disk
   write only. The directory is kept in --work and reused by later runs of the same shape.
   `--source fp8` writes DeepSeek-V3's released FP8 layout instead (e4m3 linear weights in the
   decoder layers, a `weight_scale_inv` per 128 × 128 block): half the disk a layer (three DeepSeek-V3
   layers and their output fit a 64 GiB disk, against two from bf16).
2. Writes `--seqs` × `--seq-len` random calibration token ids (.npy).
3. On CUDA, compiles GPTQ's block kernel in a process of its own (`kernel_compile_s`; Triton keeps it
   in its cache, so only a machine's first run pays it; `--cold-kernels` leaves it to the run).
4. Runs `python -m moedsl quantize` on it in a subprocess and reads the run's report
   (moedsl-report.json): per-phase seconds, per-layer seconds, peak GPU and host memory.
5. If llm-compressor is importable, runs its `oneshot` (GPTQ W4A16, same group size, same
   tokens) on the same directory in a subprocess, for comparison.

`--nproc 1,2,4,8` runs moedsl once per rank count (`torchrun --standalone --nproc-per-node N -m moedsl
quantize`, one GPU per rank), side by side: wall time, speed-up over the first count, peak GPU and host
memory of each rank, and whether every run wrote the same bytes as the first (docs/distributed.md).

Prints ONE JSON line. Shapes:
  qwen3_30b    qwen3_moe:   H=2048, I=768,  128 experts, top-8 (Qwen3-30B-A3B)
  glm45_air    glm4_moe:    H=4096, I=1408, 128 routed + 1 shared, top-8 (GLM-4.5-Air)
  deepseek_v3  deepseek_v3: H=7168, I=2048, 256 routed + 1 shared, top-8, MLA (DeepSeek-V3)
  small        qwen3_moe:   H=256,  I=128,  16 experts, top-4 (--small: seconds on a CPU)

    python bench/e2e.py --shape qwen3_30b --layers 8
    python bench/e2e.py --shape deepseek_v3 --layers 2 --dense 0 --vocab 32000
    python bench/e2e.py --shape deepseek_v3 --layers 3 --vocab 32000 --source fp8 --no-llmcompressor
    python bench/e2e.py --small --device cpu
    python bench/e2e.py --shape glm45_air --layers 4 --nproc 1,2,4,8 --no-llmcompressor
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "qwen3_30b": ("qwen3_moe", dict(head_dim=128)),
    "glm45_air": ("glm4_moe", dict(head_dim=128)),  # else the config class's defaults are GLM-4.5-Air's
    "deepseek_v3": ("deepseek_v3", dict()),  # the config class's defaults are DeepSeek-V3's
    "small": ("qwen3_moe", dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                                vocab_size=1024)),
}


def model_config(shape: str, layers: int, dense: int, vocab: int | None):
    from transformers import AutoConfig

    model_type, overrides = SHAPES[shape]
    kw = dict(overrides, num_hidden_layers=layers, max_position_embeddings=4096)
    if vocab:
        kw["vocab_size"] = vocab
    if model_type == "qwen3_moe":
        kw["mlp_only_layers"] = list(range(dense))
    else:
        kw["first_k_dense_replace"] = dense
    config = AutoConfig.for_model(model_type, **kw)
    config.dtype = "bfloat16"
    return config


def build_checkpoint(directory: Path, config, device: str, source: str = "bf16", seed: int = 0) -> float:
    """Write a loadable checkpoint of `config` with random weights; returns the seconds it took.

    source: `bf16` (a shard per layer), or `fp8`: DeepSeek-V3's released layout (the decoder layers'
    linear weights in e4m3 with a `weight_scale_inv` per 128 × 128 block, the rest bf16), which halves
    a layer on disk and is read and dequantized on the device by the run."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.architectures = [type(model).__name__]
    # the checkpoint's names and shapes: the runtime state dict through the reversed conversion (on meta)
    runtime = {k: v for k, v in model.state_dict().items()}
    on_disk = revert_weight_conversion(model, runtime)
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    groups: dict[int, dict] = {}
    for key, t in on_disk.items():
        m = layer_re.search(key)
        groups.setdefault(int(m.group(1)) if m else -1, {})[key] = t
    g = torch.Generator(device=device).manual_seed(seed)

    def random_tensors(layer: int):
        for key, meta in sorted(groups[layer].items()):
            if meta.dim() == 1:  # norms 1, biases (and DeepSeek's routing-score correction) 0
                t = torch.ones if "norm" in key else torch.zeros
                yield key, t(meta.shape, dtype=meta.dtype)
            else:
                yield key, (torch.randn(meta.shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(
                    meta.dtype)

    names = sorted(groups)
    if source == "fp8":
        from moedsl.models.stored_formats import write_stored

        saved = json.loads(config.to_json_string(use_diff=False))
        write_stored((kv for layer in names for kv in random_tensors(layer)), directory, saved, "fp8")
    else:
        config.save_pretrained(directory)
        weight_map, total = {}, 0
        for n, layer in enumerate(names):
            shard = f"model-{n + 1:05d}-of-{len(names):05d}.safetensors"
            tensors = {key: value.cpu() for key, value in random_tensors(layer)}
            for key, value in tensors.items():
                weight_map[key] = shard
                total += value.numel() * value.element_size()
            save_file(tensors, str(directory / shard), metadata={"format": "pt"})
            del tensors
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (directory / "bench-complete").write_text("")
    return time.perf_counter() - t0


def calibration(path: Path, seqs: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    import numpy as np

    if not path.is_file():
        ids = np.random.default_rng(seed).integers(0, vocab, size=(seqs, seq_len), dtype=np.int64)
        np.save(path, ids)
    return path


def run_moedsl(model_dir: Path, out: Path, calib: Path, args, nproc: int = 0) -> dict:
    """One moedsl run; nproc > 0: under torchrun with that many ranks (0: a plain process)."""
    profile = [str(ROOT / "bench" / "stacks.py"), "--out", str(args.stacks)] if args.stacks and not nproc else []
    if profile and args.trace_layer is not None:
        profile += ["--trace-layer", str(args.trace_layer)]
    module = ["-m", "moedsl"]
    if args.switch_interval is not None:  # the interpreter's GIL switch interval, set before moedsl starts
        module = ["-c", f"import runpy, sys; sys.setswitchinterval({args.switch_interval}); sys.argv[0] = 'moedsl'; "
                        "runpy.run_module('moedsl', run_name='__main__', alter_sys=True)"]
    launch = [sys.executable, *profile, *module] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "moedsl"]
    cmd = [*launch, "quantize", "--model", str(model_dir), "--out", str(out),
           "--calib", str(calib), "--samples", str(args.seqs), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch), "--policy", args.policy, "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--device", args.device, "--pipeline", args.pipeline,
           "--no-progress", "--no-resume", "--overwrite"]
    if args.expert_blocks:
        cmd += ["--expert-blocks", str(args.expert_blocks)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if nproc:  # torchrun gives each of several ranks one thread: the same for every count (CPU bytes depend on it)
        env.setdefault("OMP_NUM_THREADS", "1")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"moedsl quantize failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads((out / "moedsl-report.json").read_text())
    peaks = [l["peak_gpu_bytes"] for l in report["layers"] if l["peak_gpu_bytes"] is not None]
    out_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    ranks = report.get("ranks") or {}
    per_rank = {}
    if ranks:
        per_rank = {"peak_gpu_gib_per_rank": [round(b / 2**30, 2) if b is not None else None
                                              for b in ranks.get("peak_gpu_bytes", [])],
                    "host_peak_gib_per_rank": [round(b / 2**30, 2) for b in ranks.get("host_peak_bytes", [])]}
    digest = hashlib.sha256()
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != "moedsl-report.json":
            digest.update(p.name.encode() + p.read_bytes())
    return {
        **per_rank,
        "checkpoint_sha256": digest.hexdigest(),
        "wall_s": round(wall, 2),
        "phases_s": report["phases"],
        "phase_peak_gpu_gib": report.get("phase_peak_gpu_gib", {}),
        "layer_s": [round(l["seconds"], 3) for l in report["layers"]],
        "first_layer_phases_s": report["layers"][0].get("phases_s", {}) if report["layers"] else None,
        "steady_layer": steady_layer(report["layers"]),
        "peak_gpu_gib": round(max(peaks) / 2**30, 2) if peaks else None,
        "host_peak_gib": round(report["host_peak_bytes"] / 2**30, 2),
        "checkpoint_gib": round(out_bytes / 2**30, 2),
    }


def steady_layer(layers: list[dict]) -> dict | None:
    """A layer after the first (which waits for the first read and the first use of every kernel): its
    mean seconds, and the mean seconds per phase added while it ran. Main-thread phases (read,
    statistics, solve, pack, replay, write_wait) add up to about its seconds; the reader's and writer's
    (read_ahead, write, resume_state) ran beside them, for the next and the previous layer."""
    later = layers[1:]
    if not later:
        return None
    names = sorted({k for l in later for k in l.get("phases_s", {})})
    return {"layers": len(later), "seconds": round(sum(l["seconds"] for l in later) / len(later), 3),
            "phases_s": {k: round(sum(l.get("phases_s", {}).get(k, 0.0) for l in later) / len(later), 3)
                         for k in names}}


IMPORT_FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1])
cls = getattr(transformers, config.architectures[0])
t2 = time.perf_counter()
if torch.cuda.is_available():
    torch.ones(1, device="cuda")
t3 = time.perf_counter()
print(json.dumps({"torch_s": round(t1 - t0, 2), "transformers_s": round(t2 - t1, 2), "cuda_init_s": round(t3 - t2, 2)}))
"""


COMPILE_KERNELS = r"""
import math, sys, time
import torch
from moedsl.gptq.block import warm_up
group = int(sys.argv[1])
t = time.perf_counter()
warm_up(torch.device("cuda"), math.gcd(128, group) if group > 0 else 128)
print(time.perf_counter() - t)
"""


def compile_kernels(group_size: int) -> float:
    """Seconds to compile (or find in Triton's cache) GPTQ's block kernel for the run's block width, in a
    fresh process: what a machine's first run waits for at `startup.kernels`, and no later run does."""
    proc = subprocess.run([sys.executable, "-c", COMPILE_KERNELS, str(group_size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compiling the block kernel failed:\n{proc.stderr[-2000:]}")
    return round(float(proc.stdout.strip().splitlines()[-1]), 2)


def import_floor(model_dir: Path) -> dict:
    """What any transformers-based tool pays before its first layer, in a fresh process: importing
    torch, transformers with the model's config and class, and starting CUDA; and the process's
    whole life (start to exit) around that."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", IMPORT_FLOOR, str(model_dir)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": round(wall, 2)}


LLMC_WORKER = r"""
import json, sys, time
import numpy as np, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, calib, out, group_size, bits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
ids = np.load(calib)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
scheme = {"W4A16": "W4A16", "W8A16": "W8A16"}.get(f"W{bits}A16", "W4A16")
recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*mlp.gate$", "re:.*router.*"])
kwargs = dict(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
              output_dir=out)
try:  # all-experts calibration (every expert sees every token), where this version offers it
    oneshot(**kwargs, moe_calibrate_all_experts=True)
    mode = "moe_calibrate_all_experts"
except TypeError:
    oneshot(**kwargs)
    mode = "default"
print(json.dumps({"seconds": time.perf_counter() - t0, "mode": mode,
                  "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}))
"""


def run_llmcompressor(model_dir: Path, out: Path, calib: Path, args) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None:
        return None
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LLMC_WORKER, str(model_dir), str(calib), str(out),
                           str(args.group_size), str(args.bits)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "mode": inner["mode"],
            "peak_gpu_gib": round(inner["peak_gpu_gib"], 2) if inner["peak_gpu_gib"] is not None else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_30b", choices=[s for s in SHAPES if s != "small"])
    p.add_argument("--small", action="store_true", help="a shrunk 2-layer model and few tokens (seconds on a CPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; --small: 2)")
    p.add_argument("--dense", type=int, default=0, help="how many first layers are dense (DeepSeek-V3 has 3)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's; smaller saves disk)")
    p.add_argument("--source", default="bf16", choices=["bf16", "fp8"],
                   help="the checkpoint's weights: bf16, or FP8 in DeepSeek-V3's block-scaled layout (half the disk)")
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences (default 64; --small: 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; --small: 64)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--policy", default="all")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--pipeline", default="overlap", choices=["overlap", "serial"])
    p.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                   help="run moedsl with this GIL switch interval (sys.setswitchinterval; Python's default 0.005): "
                        "how long the quantizer's thread may wait for the interpreter held by the reader or writer")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moedsl-e2e",
                   help="where models, calibration ids and outputs go (models are reused)")
    p.add_argument("--stacks", type=Path, default=None,
                   help="run moedsl under bench/stacks.py (the main thread's time by line) and write its JSON here")
    p.add_argument("--trace-layer", type=int, default=None,
                   help="with --stacks: torch-profile this decoder layer (table in STACKS.layerK.txt)")
    p.add_argument("--import-floor", action="store_true",
                   help="also time importing torch + transformers (config and model class) + CUDA in a fresh process")
    p.add_argument("--cold-kernels", action="store_true",
                   help="leave GPTQ's block kernel uncompiled before the run (a machine's first run compiles it: "
                        "tens of seconds, then Triton's cache serves it); by default it is compiled first, in a "
                        "process of its own, and that time is reported as kernel_compile_s")
    p.add_argument("--no-llmcompressor", action="store_true", help="skip llm-compressor even when it is installed")
    p.add_argument("--drop-model", action="store_true", help="delete the built model directory afterwards")
    p.add_argument("--expert-blocks", type=int, default=None,
                   help="moedsl's --expert-blocks (default: moedsl's; with --nproc, the largest rank count for all)")
    p.add_argument("--nproc", default=None,
                   help="rank counts to compare, e.g. 1,2,4,8: each runs under torchrun with one GPU per rank")
    args = p.parse_args(argv)
    if args.stacks and args.switch_interval is not None:
        p.error("--stacks runs moedsl under its sampler: leave out --switch-interval")
    if args.stacks and args.nproc:
        p.error("--stacks profiles one process: leave out --nproc")

    import torch

    shape = "small" if args.small else args.shape
    layers = args.layers or (2 if args.small else 8)
    args.seqs = args.seqs or (8 if args.small else 64)
    args.seq_len = args.seq_len or (64 if args.small else 2048)
    if args.small and args.group_size == 128:
        args.group_size = 64
    cuda = torch.cuda.is_available() and args.device != "cpu"
    gen_device = "cuda" if cuda else "cpu"
    config = model_config(shape, layers, args.dense, args.vocab)
    name = (f"{shape}-{layers}L-{args.dense}D" + (f"-v{args.vocab}" if args.vocab else "")
            + ("-fp8" if args.source == "fp8" else ""))
    model_dir = args.work / name
    args.work.mkdir(parents=True, exist_ok=True)
    build_seconds = None
    if not (model_dir / "bench-complete").is_file():
        shutil.rmtree(model_dir, ignore_errors=True)
        build_seconds = round(build_checkpoint(model_dir, config, gen_device, args.source), 1)
    calib = calibration(args.work / f"calib-{args.seqs}x{args.seq_len}-v{config.vocab_size}.npy", args.seqs,
                        args.seq_len, config.vocab_size)
    out = {"shape": shape, "model_type": config.model_type, "layers": layers, "dense_layers": args.dense,
           "hidden_size": config.hidden_size, "tokens": args.seqs * args.seq_len, "policy": args.policy,
           "bits": args.bits, "group_size": args.group_size, "pipeline": args.pipeline, "source": args.source,
           "switch_interval": args.switch_interval, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "model_gib": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30, 2),
           "build_s": build_seconds}
    if args.import_floor:
        out["import_floor"] = import_floor(model_dir)
    if cuda and not args.cold_kernels:
        out["kernel_compile_s"] = compile_kernels(args.group_size)
    try:
        if args.nproc:
            counts = [int(n) for n in args.nproc.split(",")]
            # the same blocks for every count (the bytes depend on them, not on the ranks): the most ranks'
            args.expert_blocks = args.expert_blocks or max(counts)
            runs = {}
            for n in counts:
                runs[n] = run_moedsl(model_dir, args.work / f"{name}-moedsl-out", calib, args, nproc=n)
                shutil.rmtree(args.work / f"{name}-moedsl-out", ignore_errors=True)
            base = runs[counts[0]]
            for n, r in runs.items():
                r["speedup"] = round(base["wall_s"] / r["wall_s"], 2)
                r["same_bytes_as_first"] = r["checkpoint_sha256"] == base["checkpoint_sha256"]
            out["moedsl_by_ranks"] = {str(n): r for n, r in runs.items()}
            out["moedsl"] = base
        else:
            out["moedsl"] = run_moedsl(model_dir, args.work / f"{name}-moedsl-out", calib, args)
        shutil.rmtree(args.work / f"{name}-moedsl-out", ignore_errors=True)
        if not args.no_llmcompressor and args.source == "fp8":  # the side-by-side figure is the bf16 source's
            out["llmcompressor"] = {"not_run": "an FP8 source: compare on the bf16 one (--source bf16)"}
        elif not args.no_llmcompressor:
            out["llmcompressor"] = run_llmcompressor(model_dir, args.work / f"{name}-llmc-out", calib, args)
            llmc = out["llmcompressor"]
            if llmc and "wall_s" in llmc:
                out["speedup_vs_llmcompressor"] = round(llmc["wall_s"] / out["moedsl"]["wall_s"], 2)
    finally:  # a failed run must not leave tens of GB behind for the next shape
        shutil.rmtree(args.work / f"{name}-moedsl-out", ignore_errors=True)
        shutil.rmtree(args.work / f"{name}-llmc-out", ignore_errors=True)
        if args.drop_model:
            shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
