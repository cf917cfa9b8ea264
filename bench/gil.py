"""How much the background reader and writer slow the main thread's small torch ops (the GIL).

While a layer is quantized, the main thread launches thousands of small GPU kernels; each launch
needs the GIL. The reader (layer i+1 from the shards) and the writer (layer i-1's packed tensors
to a shard, then the resume state) run on threads of the same process. This times a tight loop of
small torch ops on the main thread alone, then while each background stage runs once on a
Qwen3-30B-A3B-shaped layer (128 experts, H=2048, I=768; W4 g128, the real `Packer` and
`LayerWriter`; the reader on a checkpoint built by `bench/e2e.py`, when `--model` is given; on a
GPU, also the run's CUDA and Triton warm-up, run first so that it starts CUDA cold), and prints one JSON line: per stage its seconds and the main loop's slowdown (op time while the stage
runs / op time alone; 1.0 = no contention).

    python bench/gil.py --model /tmp/e2e/qwen3_30b-8L-0D      # reader and writer
    python bench/gil.py                                         # the writer only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch


def packed_layer(writer, dtype, experts: int, hidden: int, inter: int, device: torch.device, seed: int = 0) -> list:
    """A layer's `Packed` modules as the run's packer makes them (on the GPU when there is one, into pinned
    host memory): attention linears and stacked experts."""
    from moedsl.execute.packer import Packer
    from moedsl.gptq.quantizer import QuantStack

    g = torch.Generator(device).manual_seed(seed)
    packer = Packer(writer, dtype)
    gs = writer.cfg.group_size

    def stack(n, out, inp):
        groups = inp // gs
        return QuantStack(codes=torch.randint(0, 16, (n, out, inp), generator=g, dtype=torch.uint8, device=device),
                          scales=(torch.rand(n, out, groups, generator=g, device=device) + 0.01).half().float(),
                          zeros=torch.full((n, out, groups), 8, dtype=torch.int32, device=device),
                          g_idx=(torch.arange(inp, dtype=torch.int32, device=device) // gs).expand(n, inp).contiguous(),
                          bias=None)

    p = "model.layers.0."
    out = []
    for name, (o, i) in {"self_attn.q_proj": (4096, hidden), "self_attn.k_proj": (512, hidden),
                         "self_attn.v_proj": (512, hidden), "self_attn.o_proj": (hidden, 4096)}.items():
        out.append(packer.pack([p + name], stack(1, o, i), expert=False))
    for proj, (o, i) in {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}.items():
        out.append(packer.pack([f"{p}mlp.experts.{e}.{proj}" for e in range(experts)], stack(experts, o, i),
                               expert=True))
    return out


class _NoSource:
    """The writer's source for the layer's unquantized tensors: none here (they are a few norms)."""

    def read_tensors(self, keys):
        return iter(())


def main_loop(seconds: float, stop: threading.Event | None = None) -> tuple[int, float, float]:
    """Small torch ops until `seconds` pass (or `stop` is set): (ops, elapsed, longest wait between two
    batches of 10 ops). A thread that holds the GIL in one long call shows as a long wait; a thread
    that only competes for a CPU core shows as a lower op rate."""
    x = torch.ones(256, device="cuda" if torch.cuda.is_available() else "cpu")  # kernel launches on a GPU
    n, t0 = 0, time.perf_counter()
    last, longest = t0, 0.0
    while True:
        for _ in range(10):
            x = x * 1.0001 + 0.0
        n += 10
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
        t = now - t0
        if (stop is not None and stop.is_set()) or (stop is None and t >= seconds):
            return n, t, longest


def contended(work) -> dict:
    """Run `work` on a thread while the main loop runs; the stage's seconds and the loop's op rate."""
    done = threading.Event()
    took = {}

    def run():
        t0 = time.perf_counter()
        work()
        took["s"] = time.perf_counter() - t0
        done.set()

    th = threading.Thread(target=run)
    th.start()
    n, t, longest = main_loop(0, done)
    th.join()
    return {"stage_s": round(took["s"], 3), "op_us": t / n * 1e6, "longest_wait_s": round(longest, 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a checkpoint from bench/e2e.py (times the reader too)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--tokens", type=int, default=64 * 2048, help="calibration tokens (the resume state's size)")
    p.add_argument("--alone-s", type=float, default=2.0, help="seconds of the main loop alone (the baseline)")
    args = p.parse_args(argv)

    from moedsl.execute.outdir import hold
    from moedsl.execute.writer import FinishedLayer, LayerWriter
    from moedsl.gptq.quantizer import QuantConfig
    from moedsl.write.checkpoint import CheckpointWriter

    dtype = torch.bfloat16
    n, t, longest = main_loop(args.alone_s)
    alone = t / n * 1e6
    out = {"op_us_alone": round(alone, 3), "longest_wait_s_alone": round(longest, 3)}
    if torch.cuda.is_available():  # the run's warm-up thread (CUDA context, GPTQ's Triton kernel) beside startup
        from moedsl.execute.run import _warm_up

        res = contended(lambda: _warm_up(torch.device("cuda"), 128))
        out["warm_up"] = {"stage_s": res["stage_s"], "slowdown": round(res["op_us"] / alone, 2),
                          "longest_wait_s": res["longest_wait_s"]}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = CheckpointWriter(Path(tmp) / "out", "gptq", QuantConfig(bits=4, group_size=128, scale_dtype="float16"))
        outdir = hold(Path(tmp) / "out", resume=False, overwrite=True)
        outdir.begin()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        packed = packed_layer(ckpt, dtype, args.experts, args.hidden, args.inter, device)
        acts = {f"x.{b}": torch.randn(args.tokens // 8, args.hidden).to(dtype) for b in range(8)}  # 8 batches
        layer = FinishedLayer(0, "layer-00000.safetensors", packed, [], acts, {"fingerprint": {}, "layers": []})
        stage = LayerWriter(ckpt, _NoSource(), outdir.commit_layer, overlap=False)
        res = contended(lambda: stage._write(layer))
        out["writer"] = {"stage_s": res["stage_s"], "slowdown": round(res["op_us"] / alone, 2),
                         "longest_wait_s": res["longest_wait_s"], "modules": sum(len(x.names) for x in packed),
                         "packed_mib": round(sum(x.buffer.numel() for x in packed) / 2**20, 1)}
        outdir.release()
    if args.model is not None:
        from moedsl.execute.model_check import open_model
        from moedsl.execute.options import QuantizeOptions

        opts = QuantizeOptions(model=args.model, out=Path(tempfile.gettempdir()) / "gil-unused", device="cpu")
        loader, _, _ = open_model(args.model, opts, torch.device("cpu"))
        pin = torch.cuda.is_available()  # as the run reads: into pinned memory when there is a GPU
        loader.read_layer(1, pin=pin)  # the page cache warm, as for a layer the run reads ahead
        res = contended(lambda: loader.read_layer(0, pin=pin))
        out["reader"] = {"stage_s": res["stage_s"], "slowdown": round(res["op_us"] / alone, 2),
                         "longest_wait_s": res["longest_wait_s"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
