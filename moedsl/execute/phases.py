"""Where a run's time goes: wall-clock seconds per phase, for the report and `bench/e2e.py`.

Phases on the main thread nest (`pack` runs inside `solve`): a phase's figure excludes the
phases inside it, so the main thread's figures add up to its wall time. On CUDA a phase
synchronizes the device when it starts and ends, so GPU work is charged to the phase that
queued it (a few synchronizations per stage, next to the many GPTQ makes anyway). The
background reader and writer add their own busy time with `add`, in phases of their own
(`read_ahead`, `write`, `resume_state`): those overlap the main thread's.

On CUDA the synchronized phases also say where the memory peak is reached: a phase during which
the device's peak allocation rose records the new peak (`peaks`; the run resets the peak at each
layer, so this is the largest per-layer peak reached in the phase).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import torch

# main-thread phases in which the GPU works; the rest of the main thread's time it idles
GPU_PHASES = ("statistics", "solve", "pack", "replay", "head")


class Phases:
    def __init__(self, device: torch.device | None = None):
        self.sync = device is not None and device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}  # phase → the highest device peak first reached inside it
        self._inner: list[float] = []  # per open phase: seconds spent in phases nested inside it
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, name: str, sync: bool = True, peak: str | None = None):
        """sync=False: no synchronization for this phase (a short one nested in another, `pack` in
        `solve`): its GPU work is charged to the phase around it, and the device queue is not drained.
        peak: the name its memory peak is recorded under, when finer than the phase's (a stage's)."""
        sync = sync and self.sync
        if sync:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.max_memory_allocated(self.device)
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
                after = torch.cuda.max_memory_allocated(self.device)
                if after > before:
                    key = peak or name
                    self.peak_bytes[key] = max(after, self.peak_bytes.get(key, 0))
            elapsed = time.perf_counter() - t0
            self.add(name, elapsed - self._inner.pop())
            if self._inner:
                self._inner[-1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def snapshot(self) -> dict[str, float]:
        """The seconds per phase so far (a layer's own are the difference of two snapshots)."""
        with self._lock:
            return dict(self.seconds)

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Seconds per phase added between two snapshots (phases that added none left out)."""
        added = {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}
        return {k: round(v, 4) for k, v in added.items() if v > 0}

    def peaks(self) -> dict[str, float]:
        """GiB per phase that raised the device's peak (CUDA; empty elsewhere)."""
        return {k: round(v / 2**30, 3) for k, v in sorted(self.peak_bytes.items())}

    def summary(self, wall: float) -> dict[str, float]:
        """Seconds per phase, `wall`, and `gpu_idle`: the wall time outside the GPU phases."""
        with self._lock:
            out = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        busy = sum(self.seconds.get(k, 0.0) for k in GPU_PHASES)
        out["wall"] = round(wall, 4)
        out["gpu_idle"] = round(max(0.0, wall - busy), 4)
        return out


class _NoPhases:
    """Timers that time nothing (a LayerQuantizer used on its own)."""

    @contextlib.contextmanager
    def __call__(self, name: str, sync: bool = True, peak: str | None = None):
        yield

    def add(self, name: str, seconds: float) -> None:
        pass


NO_PHASES = _NoPhases()
