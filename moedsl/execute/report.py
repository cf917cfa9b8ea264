"""The run report: per target (loss, error, tokens seen, time), per stage and per layer; JSON and a summary table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from moedsl.execute.layer import LayerResult


@dataclass
class Report:
    model: str
    definition: str
    arch: str
    device: str
    policy: str
    options: dict
    warnings: list[str]
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    host_peak_bytes: int = 0
    head: dict | None = None  # lm_head's GPTQ and RTN error when it was quantized
    remote_code: dict | None = None  # the model directory's own code that ran: its files and their sha256
    phases: dict = field(default_factory=dict)  # seconds per phase of the run (moedsl/execute/phases.py)
    phase_peaks: dict = field(default_factory=dict)  # GiB: the device peak each phase raised it to (CUDA)
    solver: str = "gptq"  # the name the solver gives itself (options.solver is how it was asked for)
    config_added: list[str] = field(default_factory=list)  # config.json fields written for the engine
    ranks: dict | None = None  # several ranks: how many, and each one's peak memory (moedsl/execute/distributed.py)

    @staticmethod
    def start(opts, plan, model: str, definition: str, device: str, warnings: list[str]) -> "Report":
        return Report(model=model, definition=definition, arch=plan.arch, device=device, policy=str(plan.policy),
                      options={k: str(v) for k, v in opts.model_dump().items()}, warnings=list(warnings))

    def add_layer(self, i: int, kind: str, seconds: float, peak_gpu: int | None, result: LayerResult,
                  tokens: int, phases: dict[str, float] | None = None) -> None:
        """phases: the seconds each phase added while this layer ran (the background reader's and writer's
        included: the next layer's read, the previous layer's write)."""
        self.layers.append({
            "layer": i, "kind": kind, "seconds": seconds, "peak_gpu_bytes": peak_gpu, "tokens": tokens,
            "phases_s": phases or {},
            "starved_experts": result.starved,
            "stages": [{
                "stage": s.index, "seconds": s.seconds, "error": s.error, "rtn_error": s.rtn_error,
                "targets": [{"id": t.id, "matrices": t.matrices, "loss": t.loss, "error": t.error,
                             "rtn_error": t.rtn_error, "tokens": t.tokens, "no_tokens": t.no_tokens,
                             "seconds": t.seconds} for t in s.targets],
            } for s in result.stages],
        })

    def finish(self, seconds: float, host_peak: int) -> None:
        self.seconds = seconds
        self.host_peak_bytes = host_peak

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "definition": self.definition, "arch": self.arch, "device": self.device,
                "policy": self.policy, "options": self.options, "warnings": self.warnings, "layers": self.layers,
                "seconds": self.seconds, "host_peak_bytes": self.host_peak_bytes, "lm_head": self.head,
                "remote_code": self.remote_code, "phases": self.phases, "phase_peak_gpu_gib": self.phase_peaks,
                "solver": self.solver, "config_added": self.config_added, "ranks": self.ranks}

    def stage_rows(self) -> list[tuple[str, int, float, float, float]]:
        """(kind, stage, seconds, GPTQ error, RTN error) summed over the layers of each kind."""
        rows: dict[tuple[str, int], list[float]] = {}
        for layer in self.layers:
            for s in layer["stages"]:
                acc = rows.setdefault((layer["kind"], s["stage"]), [0.0, 0.0, 0.0])
                acc[0] += s["seconds"]
                acc[1] += s["error"]
                acc[2] += s["rtn_error"]
        return [(k, st, *v) for (k, st), v in sorted(rows.items())]


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_summary(report: Report, console: Console | None = None) -> None:
    con = console or Console(stderr=True)
    t = Table(title=f"moedsl: {report.arch}, policy {report.policy}, on {report.device}")
    for col in ("layer kind", "stage", "seconds", "GPTQ error", "RTN error", "GPTQ/RTN"):
        t.add_column(col, justify="right" if col not in ("layer kind",) else "left")
    for kind, stage, sec, err, rtn in report.stage_rows():
        t.add_row(kind, str(stage), f"{sec:.2f}", f"{err:.3e}", f"{rtn:.3e}", f"{err / rtn:.2f}" if rtn else "-")
    con.print(t)
    peaks = [l["peak_gpu_bytes"] for l in report.layers if l["peak_gpu_bytes"] is not None]
    starved = sum(len(v) for l in report.layers for v in l["starved_experts"].values())
    con.print(f"{len(report.layers)} layers in {report.seconds:.1f} s; peak GPU memory {_gib(max(peaks) if peaks else None)} "
              f"GiB; host peak {_gib(report.host_peak_bytes)} GiB; experts without calibration tokens: {starved}")
