"""Time compiling the Qwen3-235B-A22B hook plan (94 layers, 128 experts, meta device) on one CPU thread.

    python bench/compile_235b.py [--repeat N] [--policy all]

Prints the model construction time (config → meta model; not part of the compile) and the
compile time (bind + compile: `compile_plan`), best and median of N runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "tests" / "data" / "qwen3_235b_a22b_config.json"
DEFINITION = REPO / "model_defs" / "qwen3_moe.moedef"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--policy", default="all")
    ap.add_argument("--tokens", type=int, default=131072)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from moedsl.lang.library import load
    from moedsl.models.source import build, config_from_file
    from moedsl.plan.compiler import compile_plan

    t0 = time.perf_counter()
    config = config_from_file(CONFIG)
    model = build(config)
    build_s = time.perf_counter() - t0
    definition = load(DEFINITION)

    times = []
    plan = None
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        plan = compile_plan(definition, model, policy=args.policy, tokens=args.tokens)
        times.append(time.perf_counter() - t)
    assert plan is not None
    moe = plan.kind("moe")
    print(f"model: Qwen3-235B-A22B config, {plan.num_layers} layers, {plan.num_experts} experts, meta device, "
          f"torch threads {torch.get_num_threads()}")
    print(f"model construction (config + meta model, not timed below): {build_s:.3f} s")
    print(f"compile_plan (bind + compile, policy {plan.policy}): first {times[0]:.3f} s, "
          f"best {min(times):.3f} s, median {statistics.median(times):.3f} s over {len(times)} runs")
    print(f"plan: {len(plan.kinds)} kind(s), {len(moe.layers)} MoE layers, "
          f"{sum(len(s.targets) for s in moe.stages)} targets per layer, "
          f"Hessians {moe.memory.hessian_bytes / 2**30:.3f} GiB per layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
