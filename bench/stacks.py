"""Where a Python program's main thread spends its wall time: a sampling profiler for one run.

cProfile sees only the thread it runs on and slows every call; this samples the main thread's
stack from a background thread every --interval seconds and weights each sample by the wall
time since the previous one, so time the main thread spends in a long C call (a CUDA
synchronization, a file read, a GIL handed to another thread) lands on the line that made the call.
It runs a module as `python -m` would (or a script), then writes a JSON file with the heaviest
stacks and lines, and prints the top lines:

    python bench/stacks.py --out stacks.json -m moedsl quantize --model DIR --out OUT ...
    python bench/e2e.py --shape qwen3_30b --layers 4 --stacks stacks.json   # the run under it

Two views: `lines` (the innermost frame in --focus code, default moedsl/: which of our lines the
time goes to, whatever library it ends in) and `leaves` (the innermost frame of all: which
library call).

`--trace-layer K` also runs decoder layer K's quantization (`LayerQuantizer.run`) under the torch
profiler and writes its table (by device time) beside --out: what the layer costs inside a run,
to set against `bench/moe_layer.py --profile` (the same layer alone).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import threading
import time
from collections import Counter


def sample(main_ident: int, interval: float, stop: threading.Event, focus: str, out: dict) -> None:
    stacks: Counter = Counter()
    lines: Counter = Counter()
    leaves: Counter = Counter()
    last = time.perf_counter()
    while not stop.wait(interval):
        frame = sys._current_frames().get(main_ident)
        now = time.perf_counter()
        dt, last = now - last, now
        if frame is None:
            continue
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_filename}:{frame.f_lineno}:{code.co_name}")
            frame = frame.f_back
        leaves[names[0]] += dt
        ours = [n for n in names if focus in n]
        if ours:
            lines[ours[0]] += dt
            stacks[" < ".join(ours[:6])] += dt
    out.update(lines=lines, leaves=leaves, stacks=stacks)


def trace_layer(index: int, path: str, rows: int = 40) -> None:
    """Wrap LayerQuantizer.run so that decoder layer `index` runs under the torch profiler; the table goes to path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moedsl.execute.layer import LayerQuantizer

    plain = LayerQuantizer.run

    def run(self, *args, **kwargs):
        if self.index != index:
            return plain(self, *args, **kwargs)
        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            result = plain(self, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        with open(path, "w") as f:
            f.write(f"decoder layer {index}: {wall:.3f} s wall inside the run\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=rows))
        return result

    LayerQuantizer.run = run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the profile")
    p.add_argument("--interval", type=float, default=0.002, help="seconds between samples")
    p.add_argument("--focus", default="moedsl/", help="path part that marks our own code")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--trace-layer", type=int, default=None, help="torch-profile this decoder layer's quantization")
    p.add_argument("-m", dest="module", help="run this module as `python -m` would")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the script (without -m) and its arguments")
    args = p.parse_args()
    target = args.module or args.rest.pop(0)
    sys.argv = [target, *args.rest]
    if args.trace_layer is not None:
        trace_layer(args.trace_layer, str(args.out) + f".layer{args.trace_layer}.txt")
    stop, found = threading.Event(), {}
    sampler = threading.Thread(target=sample, args=(threading.main_thread().ident, args.interval, stop, args.focus,
                                                    found), daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    code = 0
    try:
        if args.module:
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        stop.set()
        sampler.join()
        wall = time.perf_counter() - t0
        result = {"wall_s": round(wall, 3)}
        for view in ("lines", "leaves", "stacks"):
            result[view] = [[k, round(v, 3)] for k, v in found.get(view, Counter()).most_common(args.top * 3)]
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"stacks: {wall:.1f} s sampled; top lines in {args.focus}:", file=sys.stderr)
        for k, v in result["lines"][: args.top]:
            print(f"{v:8.2f} s  {k}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
