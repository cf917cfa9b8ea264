"""What is on the GPU at a run's memory peak, and which code put it there.

Runs `moedsl quantize ARGS` in this process under CUDA's allocation history
(`torch.cuda.memory._record_memory_history`, with Python stacks), then replays the history's
allocations and frees to the moment the most bytes were allocated, and groups the blocks live
then by the innermost moedsl line that allocated them, and by their innermost library frames.
The report's `phase_peak_gpu_gib` says which phase raised the peak; this says what it holds.

    python bench/peak.py --model /tmp/e2e/glm45_air-2L-0D --out /tmp/peak-out --calib ids.npy \
        --samples 64 --seq-len 2048 --policy all --no-progress --no-resume --overwrite

Prints one JSON line (peak, the top groups) on stdout and a table on stderr. Recording stacks
slows the run, so its times are not the run's. CUDA only: the history is the CUDA caching
allocator's. Found this way: GLM-4.5-Air's statistics and replay peaks (docs/benchmarks.md,
"Session 7").
"""

from __future__ import annotations

import collections
import json
import sys

GIB = float(1 << 30)
MAX_EVENTS = 4_000_000  # the history is a ring: a longer run loses its first events


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """(peak bytes, the `alloc` events of the blocks live at the peak), from an allocator trace."""
    live: dict[int, int] = {}
    total = peak = 0
    at = -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, at = total, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
    blocks: dict[int, dict] = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            blocks[e["addr"]] = e
        elif e["action"] == "free_completed":
            blocks.pop(e["addr"], None)
    return peak, list(blocks.values())


def by_frame(blocks: list[dict], key) -> list[dict]:
    """Blocks grouped by key(frames): bytes and count per group, largest first."""
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for b in blocks:
        g = groups[key(b.get("frames") or [])]
        g[0] += b["size"]
        g[1] += 1
    return [{"where": k, "gib": round(v[0] / GIB, 3), "blocks": v[1]}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])]


def innermost_moedsl(frames: list[dict]) -> str:
    for f in frames:
        if "/moedsl/" in f["filename"]:
            return f"moedsl/{f['filename'].split('/moedsl/')[-1]}:{f['line']} {f['name']}"
    return "(no moedsl frame)"


def innermost(frames: list[dict], depth: int = 3) -> str:
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}" for f in frames[:depth]) or "(no frame)"


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/peak.py needs a CUDA device: the allocation history is CUDA's", file=sys.stderr)
        return 2
    torch.cuda.memory._record_memory_history(max_entries=MAX_EVENTS, stacks="python")
    from moedsl.cli import main as moedsl_main

    rc = moedsl_main(["quantize", *argv])
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if rc != 0:
        return rc
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, blocks = live_at_peak(events)
    out = {"max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
           "replayed_peak_gib": round(peak / GIB, 3), "events": len(events), "truncated": len(events) >= MAX_EVENTS,
           "by_moedsl_line": by_frame(blocks, innermost_moedsl)[:12],
           "by_innermost_frames": by_frame(blocks, innermost)[:12]}
    if out["truncated"]:
        print(f"the history kept only the last {MAX_EVENTS} events: blocks allocated before them are not counted",
              file=sys.stderr)
    for title, rows in (("innermost moedsl line", out["by_moedsl_line"]),
                        ("innermost frames", out["by_innermost_frames"])):
        print(f"live at the {out['replayed_peak_gib']} GiB peak, by {title}:", file=sys.stderr)
        for r in rows:
            print(f"  {r['gib']:8.3f} GiB {r['blocks']:6d}  {r['where']}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
