"""The arithmetic a layer's stages must do, and the time that arithmetic takes at the card's peak.

Counted per stage of a plan (moedsl/plan/schema.py), for T calibration tokens, k routed experts
per token:

  statistics  2·n·f² per Hessian of f features over the n rows it sees (T for a shared key and
              under `all`; the routed rows, k·T in all, for per-expert keys of `routed`)
  experts     every expert's gate and up on the rows its down Hessian sees (2·n·H·I per role and
              expert) — the forward that feeds the down projections' statistics
  solve       GPTQ's lazy-batch updates, out·in² per matrix (a multiply-add for each of the in²/2
              column pairs of every row), and ~in³ for the factorizations of each distinct Hessian
  replay      the layer with native routing: k experts per token, 3 projections of 2·H·I each

The floor of a stage: its matmul arithmetic (statistics, experts, replay) at the card's bf16
tensor-core rate, plus its solve arithmetic at the fp32 rate (GPTQ runs in true fp32). Attention
and the forward up to each capture point are not counted (under 2 % at the shapes benched).
"""

from __future__ import annotations

# dense peak rates, FLOP/s: bf16 tensor cores, fp32 (no tensor cores), from the vendors' data sheets
PEAKS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
}


def peaks(device_name: str) -> tuple[float, float] | None:
    for key, rates in PEAKS.items():
        if key in device_name:
            return rates
    return None


def stage_flops(kind, stage, tokens: int, top_k: int, routed_rows: dict[str, int] | None = None) -> dict[str, float]:
    """{matmul, solve} FLOP of one stage of `kind`; routed_rows: rows a per-expert key saw in all (default k·T)."""
    matmul = solve = 0.0
    by_key = {k.key: k for k in stage.stats}
    for key in stage.stats:
        if key.per_expert and key.tokens == "routed":
            rows = (routed_rows or {}).get(key.key, top_k * tokens)
        else:
            rows = tokens * (key.experts if key.per_expert else 1)
        matmul += 2.0 * rows * key.features ** 2
        if key.capture.kind == "experts_hidden":
            ex = next(m.experts for m in kind.moe if m.experts.path == key.capture.path)
            roles = 2  # gate and up (an `mlp` expert has only up: counted as glu, an upper bound)
            matmul += 2.0 * rows * ex.hidden_size * ex.intermediate_size * roles
    hessians = set()
    for t in stage.targets:
        matrices = t.experts or 1
        solve += float(matrices) * t.out_features * t.in_features ** 2
        key = by_key[t.stats]
        hessians.add((key.key, key.experts if key.per_expert else 1, t.in_features))
    for _, count, cols in hessians:
        solve += float(count) * cols ** 3
    return {"matmul": matmul, "solve": solve}


def replay_flops(kind, tokens: int, top_k: int) -> float:
    total = 0.0
    for moe in kind.moe:
        ex = moe.experts
        total += 2.0 * tokens * top_k * 3 * ex.hidden_size * ex.intermediate_size
    return total


def account(plan, result, tokens: int, top_k: int, device_name: str, replay_seconds: float | None = None) -> dict:
    """Per stage: FLOP, achieved rate and share of the floor, from a LayerResult's stage times."""
    kind = plan.kind_for_layer(0)
    rates = peaks(device_name)
    stages = {}
    floor_total = 0.0
    for stage, report in zip(kind.stages, result.stages):
        f = stage_flops(kind, stage, tokens, top_k)
        row = {"targets": [t.id for t in stage.targets], "seconds": round(report.seconds, 3),
               "tflop": round((f["matmul"] + f["solve"]) / 1e12, 2),
               "achieved_tflops": round((f["matmul"] + f["solve"]) / max(report.seconds, 1e-9) / 1e12, 1)}
        if rates:
            floor = f["matmul"] / rates[0] + f["solve"] / rates[1]
            floor_total += floor
            row["floor_seconds"] = round(floor, 3)
            row["share_of_floor"] = round(floor / max(report.seconds, 1e-9), 2)
        stages[str(stage.index)] = row
    out = {"stages": stages}
    r = replay_flops(kind, tokens, top_k)
    if rates:
        floor_total += r / rates[0]
        out["floor_seconds"] = round(floor_total, 3)
        out["peak_rates_tflops"] = {"bf16": rates[0] / 1e12, "fp32": rates[1] / 1e12}
    if replay_seconds is not None:
        out["replay"] = {"seconds": round(replay_seconds, 3), "tflop": round(r / 1e12, 2)}
    return out
