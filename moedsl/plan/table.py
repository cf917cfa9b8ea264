"""The hook plan as tables (`moedsl plan`) and as one plain-text summary line per layer kind.

One table per layer kind: a row per statistics key, grouped by stage, with the targets that read
it (expert targets collapsed: `mlp.experts.{0..127}.gate_proj`), their out × in, the key's
feature size and Hessian count (`×128` for per-expert keys), the capture point (`■ stop` marks
the stage's early-stop capture) and the stage's Hessian and activation MiB. Under the table: the
layer's totals and its peak stage in GiB, the MoE blocks and what is not quantized.
"""

from __future__ import annotations

from typing import Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from moedsl.plan.compiler import peak_stage
from moedsl.plan.schema import CapturePoint, HookPlan, KindPlan, Target

MiB = 1024 ** 2
GiB = 1024 ** 3


def compress_indices(indices: Iterable[int]) -> str:
    """`[0, 2, 3, 4, 7]` → `0,2-4,7`."""
    xs = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def collapse(text: str, experts: int | None) -> str:
    """`mlp.experts.{e}.gate_proj` → `mlp.experts.{0..127}.gate_proj`."""
    if experts is None or "{e}" not in text:
        return text
    return text.replace("{e}", f"{{0..{experts - 1}}}")


def gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB"


def mib(n: int) -> str:
    v = n / MiB
    return f"{v:,.1f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def hessian_count(kind: KindPlan) -> int:
    return sum((k.experts or 1) if k.per_expert else 1 for s in kind.stages for k in s.stats)


def _capture_text(c: CapturePoint) -> str:
    """The capture's kind; its path is the first target of the row (linear_input: the first
    member of the group; experts_input / experts_hidden: the experts module)."""
    return {"linear_input": "input", "experts_input": "experts in", "experts_hidden": "expert hidden",
            "grouped_input": "grouped rows"}[c.kind]


def _target_text(t: Target) -> Text:
    out = Text(collapse(t.id, t.experts))
    if t.shared_expert:
        out.append(" shared", style="dim")
    return out


def header_line(plan: HookPlan) -> str:
    moe = f" · {plan.num_experts} experts, top-{plan.top_k}" if plan.num_experts else ""
    composite = (f"\nlanguage model {plan.language_model} (calibrated on text) · towers copied unquantized: "
                 f"{', '.join(plan.towers) or 'none'}" if plan.language_model else "")
    return (f"{plan.arch} · {plan.model_class} ({plan.model_type}) · policy {plan.policy} · "
            f"{plan.tokens:,} calibration tokens · {plan.num_layers} layers{moe}{composite}")


def summary_line(plan: HookPlan, kind: KindPlan) -> str:
    """One plain-text line: layers, stages, targets, keys, Hessians, memory per layer and peak stage."""
    targets = [t for s in kind.stages for t in s.targets]
    per_expert = [t for t in targets if t.experts]
    keys = sum(len(s.stats) for s in kind.stages)
    peak = peak_stage(kind)
    apeak = peak_stage(kind, "activation_bytes")
    experts = f" ({len(per_expert)} per-expert ×{per_expert[0].experts})" if per_expert else ""
    line = (f"{kind.name}: layers {compress_indices(kind.layers)} ({len(kind.layers)}) · {len(kind.stages)} stages · "
            f"{len(targets)} targets{experts} · {keys} statistics keys = {hessian_count(kind)} Hessians · "
            f"Hessians {gib(kind.memory.hessian_bytes)}/layer")
    if peak is not None:
        line += f" (peak stage {peak.index}: {gib(peak.memory.hessian_bytes)})"
    line += f" · activations {gib(kind.memory.activation_bytes)}/layer"
    if apeak is not None:
        line += f" (peak stage {apeak.index}: {gib(apeak.memory.activation_bytes)})"
    return line


def summary_lines(plan: HookPlan) -> list[str]:
    return [summary_line(plan, k) for k in plan.kinds]


def kind_table(plan: HookPlan, kind: KindPlan) -> Table:
    title = Text(f"layer kind {kind.name} · layers {compress_indices(kind.layers)} "
                 f"({len(kind.layers)} × {kind.layer_class})", style="bold")
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("stage", justify="right", no_wrap=True, min_width=5)
    table.add_column("targets", no_wrap=True)
    table.add_column("out × in", justify="right", no_wrap=True)
    table.add_column("statistics key", no_wrap=True)
    table.add_column("features", justify="right", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("capture", no_wrap=True)
    table.add_column("Hessian MiB", justify="right", no_wrap=True)
    table.add_column("act. MiB", justify="right", no_wrap=True)
    for n, stage in enumerate(kind.stages):
        if n:
            table.add_section()
        marked = False
        for r, key in enumerate(stage.stats):
            members = [t for t in stage.targets if t.stats == key.key]
            targets = Text("\n").join(_target_text(t) for t in members)
            shapes = "\n".join(f"{t.out_features}×{t.in_features}" for t in members)
            capture = Text(_capture_text(key.capture))
            if key.capture == stage.stop_after and not marked:
                capture.append(" ■", style="bold yellow")
                marked = True
            count = f"×{key.experts}" if key.per_expert else "1"
            table.add_row(
                str(stage.index) if r == 0 else "", targets, shapes, Text(key.key), str(key.features), count, capture,
                mib(stage.memory.hessian_bytes) if r == 0 else "", mib(stage.memory.activation_bytes) if r == 0 else "")
    return table


def kind_footer(plan: HookPlan, kind: KindPlan) -> Text:
    out = Text("  capture: input = the input of the row's first target; experts in = the experts module's input; "
               "expert hidden = each expert's down-projection input; grouped rows = the rows a grouped container is "
               "called with, per expert\n"
               "  ■ early stop: the stage's forward may stop once this capture (and the stage's others) has fired\n",
               style="dim")
    peak = peak_stage(kind)
    apeak = peak_stage(kind, "activation_bytes")
    out.append(f"  per layer: Hessians {gib(kind.memory.hessian_bytes)} ({hessian_count(kind)} fp32 Hessians, "
               f"sum of {len(kind.stages)} stages)")
    if peak is not None:
        out.append(f", peak stage {peak.index}: {gib(peak.memory.hessian_bytes)}")
    out.append(f"\n  per layer: activations {gib(kind.memory.activation_bytes)} (bf16, {plan.tokens:,} tokens)")
    if apeak is not None:
        out.append(f", peak stage {apeak.index}: {gib(apeak.memory.activation_bytes)}")
    for moe in kind.moe:
        ex = moe.experts
        storage = "in grouped containers" if ex.grouped else "fused" if ex.tensors else "ModuleList"
        fn = ex.fn.form + (f"({ex.fn.act})" if ex.fn.act else "")
        shared = f", shared {' '.join(moe.shared)}" if moe.shared else ""
        out.append(f"\n  MoE {moe.path}: router {moe.router or '-'}, experts {ex.path} ({ex.module_class}, "
                   f"{ex.num_experts} {storage}, {fn}, routing weights scale the {ex.scale}){shared}")
        ck = "fused tensors under their runtime names" if ex.ckpt_fused else " ".join(ex.ckpt[r] for r in ex.ckpt)
        if ex.grouped:
            ck += "; written per expert as " + " ".join(ex.ckpt[r] for r in ex.ckpt)
        out.append(f"\n  checkpoint names: {ck}")
    if kind.skipped:
        out.append(f"\n  not quantized: {' '.join(kind.skipped)}", style="dim")
    return out


def render(plan: HookPlan, summary: bool = True) -> Group:
    """The header line, a table and its footer per layer kind, and (with `summary`) the summary lines."""
    parts: list = [Text(header_line(plan), style="bold")]
    for kind in plan.kinds:
        parts += [Text(""), kind_table(plan, kind), kind_footer(plan, kind)]
    if summary:
        parts.append(Text(""))
        parts += [Text(line) for line in summary_lines(plan)]
    return Group(*parts)


def print_plan(plan: HookPlan, console: Console | None = None) -> None:
    """Tables, then the summary lines unwrapped (one line per kind, for grep)."""
    console = console or Console(highlight=False)
    console.print(render(plan, summary=False))
    console.print()
    for line in summary_lines(plan):
        console.print(Text(line), soft_wrap=True)
