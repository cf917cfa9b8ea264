"""A DeepSeek-V3-shaped FP8 decoder layer: written in the published FP8 layout, streamed in,
dequantized on the device and quantized by `moedsl quantize`.

Shape (DeepSeek-V3/R1's MoE layer, random weights): H=7168, 256 routed experts of I=2048, top-8,
one shared expert, MLA attention (q_lora 1536, kv_lora 512, 128 heads); FP8 e4m3 weights with a
`weight_scale_inv` per 128x128 block, as the released checkpoints store them. One decoder layer,
and a vocabulary of 1024 (the head is not what is measured). `--experts N` shrinks the layer.

Three figures, one JSON line:
  write_seconds       making the FP8 checkpoint (random weights on the device, FP8-quantized, saved)
  load_seconds        `LayerwiseLoader.load_layer`: shards → host → device, dequantize, transformers'
                      conversion (per-expert tensors fused into gate_up_proj/down_proj)
    read_seconds      of which: the stored tensors to the device
    dequant_seconds   of which: the FP8 → bf16 dequantization alone (device)
  layer_seconds       the quantize run's layer time (load + statistics + solves + replay + pack + write),
                      with its stages; run_seconds for the whole run

    python bench/fp8_layer.py                          # on the GPU machine: the full layer
    python bench/fp8_layer.py --experts 64             # a quarter of the experts
    python bench/fp8_layer.py --small --device cpu     # a shrunk layer in seconds (tests/test_bench.py)

The FP8 checkpoint goes to --dir (default: a temporary directory, removed afterwards; the full
layer is about 12 GB on disk, and its 4-bit output about 6 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "deepseek_v3": dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                        n_shared_experts=1, n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512,
                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=128,
                        num_key_value_heads=128, intermediate_size=18432, routed_scaling_factor=2.5),
    "small": dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                  n_shared_experts=1, n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=256,
                  qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=512),
}
BLOCK = (128, 128)


def layer_config(shape: str, experts: int | None):
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    if experts:
        kw["n_routed_experts"] = experts
    return AutoConfig.for_model("deepseek_v3", num_hidden_layers=1, first_k_dense_replace=0, vocab_size=1024,
                                max_position_embeddings=4096, dtype="bfloat16", **kw)


def checkpoint_tensors(config, device: torch.device, seed: int = 0):
    """(checkpoint name, tensor) of the model, random, on `device`, named as DeepSeek-V3's checkpoints
    name them: the runtime's fused experts split back into `experts.{e}.{gate,up,down}_proj.weight`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator(device).manual_seed(seed)
    H = config.hidden_size

    def rand(shape, std):
        return (torch.randn(shape, generator=g, device=device) * std).to(torch.bfloat16)

    for name, t in meta.state_dict().items():
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            base, (E, two_i, _) = name.removesuffix("gate_up_proj"), t.shape
            for e in range(E):
                yield f"{base}{e}.gate_proj.weight", rand((two_i // 2, H), 0.02)
                yield f"{base}{e}.up_proj.weight", rand((two_i // 2, H), 0.02)
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            base, (E, h, i) = name.removesuffix("down_proj"), t.shape
            for e in range(E):
                yield f"{base}{e}.down_proj.weight", rand((h, i), 0.02)
        elif "norm" in name:
            yield name, torch.ones(t.shape, dtype=torch.bfloat16, device=device)
        elif name.endswith("e_score_correction_bias"):
            yield name, torch.zeros(t.shape, dtype=torch.float32, device=device)
        elif name.endswith("mlp.gate.weight"):  # the router: spread, so routing varies
            yield name, rand(t.shape, 1.5 / H**0.5)
        else:
            yield name, rand(t.shape, 0.02)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_load(model_dir: Path, device: torch.device) -> dict:
    """load_layer(0) as a run does it, then its two parts measured alone."""
    from safetensors import safe_open

    from moedsl.execute import dequant
    from moedsl.execute.loader import LayerwiseLoader, shard_map

    loader = LayerwiseLoader(model_dir, strict=True)
    model = loader.skeleton()
    loader.load_non_layer(model, device)
    sync(device)
    t0 = time.perf_counter()
    loader.load_layer(model, 0, device)
    sync(device)
    load = time.perf_counter() - t0
    loader.unload_layer(model, 0)
    del model

    fmt = loader.stored_format
    keys = [k for k in loader.layer_keys(0) if len(loader.stored_keys(k)) == 2]  # weight + weight_scale_inv
    shards = shard_map(model_dir)
    stored_bytes = 0
    pairs = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        handles = {}
        for key in keys:
            pair = []
            for name in loader.stored_keys(key):
                if shards[name] not in handles:
                    handles[shards[name]] = stack.enter_context(safe_open(str(shards[name]), "pt"))
                t = handles[shards[name]].get_tensor(name).to(device)
                stored_bytes += t.numel() * t.element_size()
                pair.append(t)
            pairs.append(pair)
    sync(device)
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_bytes = 0
    for w, s in pairs:
        out_bytes += dequant.fp8_block_dequantize(w, s, fmt.block, fmt.dtype).numel() * 2
    sync(device)
    deq = time.perf_counter() - t0
    return {"load_seconds": round(load, 3), "read_seconds": round(read, 3), "dequant_seconds": round(deq, 3),
            "fp8_tensors": len(keys), "stored_gib": round(stored_bytes / 2**30, 2),
            "bf16_gib": round(out_bytes / 2**30, 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a shrunk layer and few tokens (seconds on a CPU)")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default: the shape's, 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--policy", default="all")
    p.add_argument("--dir", type=Path, default=None, help="where the FP8 checkpoint and the output go (kept)")
    p.add_argument("--no-quantize", action="store_true", help="only write and load")
    args = p.parse_args(argv)

    import moedsl
    from moedsl.models.default import save_byte_tokenizer
    from moedsl.models.stored_formats import write_stored

    device = torch.device(args.device)
    shape = "small" if args.small else "deepseek_v3"
    samples, seq_len = (4, 64) if args.small else (args.samples, args.seq_len)
    root = args.dir or Path(tempfile.mkdtemp(prefix="moedsl-fp8-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    src, out_dir = root / "fp8", root / "out"
    config = layer_config(shape, args.experts)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
                 "experts": config.n_routed_experts, "hidden": config.hidden_size,
                 "moe_intermediate": config.moe_intermediate_size, "block": list(BLOCK),
                 "tokens": samples * seq_len, "policy": args.policy, "bits": 4, "group_size": 128}
    try:
        t0 = time.perf_counter()
        if src.exists():
            shutil.rmtree(src)
        saved = json.loads(config.to_json_string(use_diff=False))
        saved["architectures"] = ["DeepseekV3ForCausalLM"]
        write_stored(checkpoint_tensors(config, device), src, saved, "fp8", block=BLOCK)
        save_byte_tokenizer(src)  # calibration on the built-in text, as a real run does
        out["write_seconds"] = round(time.perf_counter() - t0, 2)
        out |= time_load(src, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_quantize:
            t0 = time.perf_counter()
            report = moedsl.quantize(model=src, out=out_dir, overwrite=True, device=str(device),
                                     samples=samples, seq_len=seq_len, batch_size=args.batch_size,
                                     policy=args.policy, group_size=128, progress=False)
            out["run_seconds"] = round(time.perf_counter() - t0, 2)
            layer = report.layers[0]
            out["layer_seconds"] = round(layer["seconds"], 2)
            out["stage_seconds"] = {s["stage"]: round(s["seconds"], 2) for s in layer["stages"]}
            peak = layer["peak_gpu_bytes"]
            out["peak_gpu_gib"] = round(peak / 2**30, 2) if peak else None
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
