"""The hook plan: compiling a bound definition into stages, targets, statistics keys and captures.

    compile_plan(definition, model, policy="routed", tokens=131072) -> HookPlan
    compile_bound(bound, policy, tokens, definition=None)           -> HookPlan
    render(plan) / print_plan(plan) / summary_lines(plan)          the `moedsl plan` table

The schema (`moedsl.plan.schema`) is the contract with the executor; see docs/plan.md.
"""

from moedsl.plan.compiler import as_policy, compile_bound, compile_plan, peak_stage
from moedsl.plan.schema import CapturePoint, HookPlan, KindPlan, Memory, Policy, Stage, StatsKey, Target
from moedsl.plan.table import compress_indices, print_plan, render, summary_lines

__all__ = ["compile_plan", "compile_bound", "as_policy", "peak_stage", "render", "print_plan", "summary_lines",
           "compress_indices", "HookPlan", "KindPlan", "Stage", "Target", "StatsKey", "CapturePoint", "Memory",
           "Policy"]
