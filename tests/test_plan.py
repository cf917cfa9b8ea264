"""The hook-plan compiler, its table and `moedsl plan` / `moedsl schema plan`.

Golden plans: `MOEDSL_UPDATE_GOLDEN=1 python -m pytest tests/test_plan.py -k golden` rewrites
tests/golden/<arch>-<policy>.json; review the diff by eye before accepting it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moedsl.cli import main as cli_main
from moedsl.errors import MoedslError
from moedsl.lang.library import load
from moedsl.lang.parser import parse
from moedsl.lang.resolve import resolve
from moedsl.plan import compile_bound, compile_plan, compress_indices, render, summary_lines
from moedsl.models.source import build, config_from_file
from moedsl.plan.schema import HookPlan, Policy

REPO = Path(__file__).resolve().parents[1]
DEFS = REPO / "model_defs"
GOLDEN = Path(__file__).resolve().parent / "golden"
DATA = Path(__file__).resolve().parent / "data"
CONFIG_30B = DATA / "qwen3_30b_a3b_config.json"
CONFIG_235B = DATA / "qwen3_235b_a22b_config.json"
UPDATE = os.environ.get("MOEDSL_UPDATE_GOLDEN") == "1"
GiB = 1024 ** 3


@lru_cache(maxsize=None)
def tiny_meta(model_type: str):
    from moedsl.models.tiny import build_model, tiny_config

    return build_model(tiny_config(model_type), device="meta")


@lru_cache(maxsize=None)
def plan_for(arch: str, policy: str) -> HookPlan:
    d = load(DEFS / f"{arch}.moedef")
    return compile_plan(d, tiny_meta(d.header.matches[0]), policy=policy)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedsl", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


# ---- golden plans ------------------------------------------------------------------------------

GOLDEN_ARCHS = ("qwen3_moe", "deepseek_v3", "gpt_oss", "dbrx", "phi3")


@pytest.mark.parametrize("policy", ["all", "routed"])
@pytest.mark.parametrize("arch", GOLDEN_ARCHS)
def test_golden_plan(arch: str, policy: str):
    if not (DEFS / f"{arch}.moedef").is_file():
        pytest.skip(f"model_defs/{arch}.moedef does not exist yet")
    plan = plan_for(arch, policy)
    got = plan.model_dump(mode="json")
    path = GOLDEN / f"{arch}-{policy}.json"
    if UPDATE:
        path.write_text(json.dumps(got, indent=1) + "\n", encoding="utf-8")
    assert path.is_file(), f"no golden {path.name}: run with MOEDSL_UPDATE_GOLDEN=1 and review it"
    want = json.loads(path.read_text(encoding="utf-8"))
    if got != want:
        import difflib

        diff = "\n".join(difflib.unified_diff(json.dumps(want, indent=1).splitlines(),
                                              json.dumps(got, indent=1).splitlines(), "golden", "now", lineterm="", n=2))
        pytest.fail(f"plan differs from {path.name} (MOEDSL_UPDATE_GOLDEN=1 rewrites it):\n{diff[:6000]}")
    assert HookPlan.model_validate(want) == plan


def _stage(plan: HookPlan, kind: str, index: int):
    return next(s for s in plan.kind(kind).stages if s.index == index)


def test_qwen3_moe_plan_structure():
    for policy in ("all", "routed"):
        plan = plan_for("qwen3_moe", policy)
        assert [k.name for k in plan.kinds] == ["moe", "dense"]
        assert plan.kind("moe").layers == (1,) and plan.kind("dense").layers == (0,)
        moe = plan.kind("moe")
        assert [s.index for s in moe.stages] == [0, 1, 2, 3]
        s0 = _stage(plan, "moe", 0)
        assert [t.id for t in s0.targets] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        assert [k.key for k in s0.stats] == ["self_attn[q_proj,k_proj,v_proj]:in"]
        assert s0.stats[0].capture.model_dump() == {"kind": "linear_input", "path": "self_attn.q_proj"}
        assert {t.stats for t in s0.targets} == {"self_attn[q_proj,k_proj,v_proj]:in"}
        s2, s3 = _stage(plan, "moe", 2), _stage(plan, "moe", 3)
        gate, up = s2.targets
        assert (gate.kind, gate.role, gate.param, gate.experts, gate.split) == ("fused", "gate", "gate_up_proj", 8, "concat")
        assert (gate.out_features, gate.in_features) == (32, 64)  # one expert
        assert gate.ckpt == "mlp.experts.{e}.gate_proj" and up.ckpt == "mlp.experts.{e}.up_proj"
        assert gate.stats == up.stats and len(s2.stats) == 1
        key = s2.stats[0]
        assert key.capture.kind == "experts_input" and key.capture.path == "mlp.experts"
        if policy == "all":
            assert key.key == "mlp.experts[gate_proj,up_proj]:in"
            assert (key.per_expert, key.experts, key.tokens) == (False, None, "all")
        else:
            assert key.key == "mlp.experts.{e}[gate_proj,up_proj]:in"
            assert (key.per_expert, key.experts, key.tokens) == (True, 8, "routed")
        (down,) = s3.targets
        (dkey,) = s3.stats
        assert down.stats == dkey.key == "mlp.experts.{e}.down_proj:in"
        assert dkey.capture.kind == "experts_hidden" and dkey.per_expert and dkey.experts == 8 and dkey.features == 32
        assert dkey.tokens == ("all" if policy == "all" else "routed")
        for s in moe.stages:
            assert s.stop_after == s.captures[-1]
        dense = plan.kind("dense")
        assert [k.key for s in dense.stages for k in s.stats] == [
            "self_attn[q_proj,k_proj,v_proj]:in", "self_attn.o_proj:in", "mlp[gate_proj,up_proj]:in", "mlp.down_proj:in"]


def test_deepseek_v3_shared_experts_and_mla():
    if not (DEFS / "deepseek_v3.moedef").is_file():
        pytest.skip("model_defs/deepseek_v3.moedef does not exist yet")
    plan = plan_for("deepseek_v3", "all")
    s0 = _stage(plan, "moe", 0)
    assert [k.key for k in s0.stats] == ["self_attn[q_a_proj,kv_a_proj_with_mqa]:in"]
    s1 = _stage(plan, "moe", 1)  # q_b_proj and kv_b_proj read different tensors (and widths)
    assert [k.key for k in s1.stats] == ["self_attn.q_b_proj:in", "self_attn.kv_b_proj:in"]
    s3 = _stage(plan, "moe", 3)
    keys = {k.key: k for k in s3.stats}
    assert set(keys) == {"mlp.experts[gate_proj,up_proj]:in", "mlp.shared_experts[gate_proj,up_proj]:in"}
    shared = keys["mlp.shared_experts[gate_proj,up_proj]:in"]
    assert shared.tokens == "all" and not shared.per_expert
    assert all(t.shared_expert for t in s3.targets if t.kind == "linear")
    # tree order: the routed experts come before the shared experts in the definition
    assert s3.stop_after.model_dump() == {"kind": "linear_input", "path": "mlp.shared_experts.gate_proj"}
    assert [c.kind for c in s3.captures] == ["experts_input", "linear_input"]


# ---- Qwen3-30B-A3B through the real CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_30b_json() -> str:
    r = run_cli("plan", str(DEFS / "qwen3_moe.moedef"), "--config", str(CONFIG_30B), "--policy", "all",
                "--tokens", "131072", "--json")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_30b_table_shows_one_shared_gate_up_statistic():
    r = run_cli("plan", "model_defs/qwen3_moe.moedef", "--config", str(CONFIG_30B.relative_to(REPO)),
                "--policy", "all", "--tokens", "131072")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "layers 0-47" in out and "policy all" in out
    rows = [line for line in out.splitlines() if "mlp.experts[gate_proj,up_proj]:in" in line]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].split("│")]
    assert "mlp.experts.{0..127}.gate_proj" in cells
    i = cells.index("mlp.experts[gate_proj,up_proj]:in")
    assert cells[i + 1:i + 3] == ["2048", "1"]  # features, one Hessian
    assert "mlp.experts.{0..127}.up_proj" in out
    down = [line for line in out.splitlines() if "mlp.experts.{e}.down_proj:in" in line]
    assert len(down) == 1 and "×128" in down[0]
    assert "moe: layers 0-47 (48)" in out  # the plain summary line


def test_30b_hessian_estimate(plan_30b_json: str):
    plan = HookPlan.model_validate_json(plan_30b_json)
    assert plan.num_layers == 48 and plan.num_experts == 128 and plan.top_k == 8
    (moe,) = plan.kinds
    # one gate/up statistic for all 128 experts
    expert_in = [k for s in moe.stages for k in s.stats if k.capture.kind == "experts_input"]
    assert len(expert_in) == 1 and not expert_in[0].per_expert and expert_in[0].features == 2048
    readers = [t for s in moe.stages for t in s.targets if t.stats == expert_in[0].key]
    assert sorted(t.role for t in readers) == ["gate", "up"] and all(t.experts == 128 for t in readers)
    ours = moe.memory.hessian_bytes
    assert ours == sum(s.memory.hessian_bytes for s in moe.stages)
    # q/k/v: 2048², o: 4096², gate/up: 2048², down: 128 × 768²; fp32
    assert ours == 4 * (2048 ** 2 + 4096 ** 2 + 2048 ** 2 + 128 * 768 ** 2)
    assert ours / GiB < 0.4
    # one Hessian per quantized module (q, k, v, o and every expert's gate, up and down)
    per_module = sum(t.in_features ** 2 * 4 * (t.experts or 1) for s in moe.stages for t in s.targets)
    assert per_module == 4 * (3 * 2048 ** 2 + 4096 ** 2 + 128 * (2 * 2048 ** 2 + 768 ** 2))
    assert 4.5e9 < per_module < 4.8e9  # ≈ 4.6 GB of it in the experts
    assert per_module / ours > 10


def test_json_round_trips(plan_30b_json: str):
    plan = HookPlan.model_validate_json(plan_30b_json)
    assert plan.model_dump_json(indent=2) + "\n" == plan_30b_json
    assert HookPlan.model_validate_json(plan.model_dump_json()) == plan
    assert plan.policy == Policy(kind="all") and plan.tokens == 131072


# ---- Qwen3-235B-A22B compile time --------------------------------------------------------------------


def test_235b_compiles_in_under_2s():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(config_from_file(CONFIG_235B))  # not timed
        d = load(DEFS / "qwen3_moe.moedef")
        t = time.perf_counter()
        plan = compile_plan(d, model, policy="all", tokens=131072)
        elapsed = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    assert plan.num_layers == 94 and plan.kind("moe").layers == tuple(range(94))
    assert elapsed < 2.0, f"compiling the 235B plan took {elapsed:.2f} s"


# ---- policies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("routed", Policy(kind="routed")),
    ("all", Policy(kind="all")),
    ("topk=4", Policy(kind="topk", top_k=4)),
    ("auto(min_tokens=8)", Policy(kind="auto", min_tokens=8)),
])
def test_policies_parse(text: str, want: Policy):
    assert Policy.parse(text) == want
    assert str(want) == text


@pytest.mark.parametrize("text", ["", "everything", "topk=0", "topk=x", "topk", "auto(min_tokens=)", "auto(8)"])
def test_bad_policies(text: str):
    with pytest.raises(MoedslError):
        Policy.parse(text)


def test_policies_in_the_plan():
    d = load(DEFS / "qwen3_moe.moedef")
    model = tiny_meta("qwen3_moe")
    tokens = 1000
    for policy, rows in (("routed", 2), ("topk=4", 4), ("auto(min_tokens=8)", 2), ("all", 1)):
        plan = compile_plan(d, model, policy=policy, tokens=tokens)
        s2 = _stage(plan, "moe", 2)
        (key,) = s2.stats
        assert key.per_expert == (policy != "all")
        assert key.tokens == ("all" if policy == "all" else "routed")
        assert s2.memory.activation_bytes == tokens * rows * 64 * 2  # experts input, bf16
        assert _stage(plan, "moe", 3).memory.activation_bytes == tokens * rows * 32 * 2  # expert hidden
    assert compile_plan(d, model, policy=Policy(kind="topk", top_k=3)).policy.top_k == 3
    with pytest.raises(MoedslError):
        compile_plan(d, model, policy="topk=9")  # more than the 8 experts
    with pytest.raises(MoedslError):
        compile_plan(d, model, policy="sometimes")
    with pytest.raises(MoedslError):
        compile_plan(d, model, tokens=0)


def test_scale_input_experts_get_per_expert_inputs_under_all():
    """With routing weights scaling each expert's input, the experts do not read one tensor."""
    from moedsl.bind.binder import bind

    d = load(DEFS / "qwen3_moe.moedef")
    bound = bind(d, tiny_meta("qwen3_moe"))
    kinds = []
    for k in bound.kinds:
        moe = tuple(m.model_copy(update={"experts": m.experts.model_copy(update={"scale": "input"})}) for m in k.moe)
        kinds.append(k.model_copy(update={"moe": moe}))
    plan = compile_bound(bound.model_copy(update={"kinds": tuple(kinds)}), "all", definition=d)
    (key,) = _stage(plan, "moe", 2).stats
    assert key.key == "mlp.experts.{e}[gate_proj,up_proj]:in" and key.per_expert and key.tokens == "all"
    # without the IR the experts still come after the block's linears
    assert compile_bound(bound, "all") == plan_for("qwen3_moe", "all")


# ---- ModuleList experts (a toy model) --------------------------------------------------------------

TOY = """
arch toy
experts config.num_local_experts
top_k config.num_experts_per_tok
layers model.layers

layer moe otherwise {
  norm:!
  attn { q_proj:0 k_proj:0 v_proj:0 o_proj:1 }
  moe:moe {
    shared:moe-share { up:2 down:3 }
    gate:router
    experts:experts {
      # { w1:2 as gate  w3:2 as up  w2:3 as down }
      fn glu(silu)
      ckpt down "moe.experts.{e}.down"
    }
  }
}
"""


class _Toy(nn.Module):
    def __init__(self, h=16, i=8, e=4, layers=3):
        super().__init__()
        self.config = SimpleNamespace(num_local_experts=e, num_experts_per_tok=2, hidden_size=h, model_type="toy")

        def layer():
            m = nn.Module()
            m.norm = nn.LayerNorm(h)
            m.attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(m.attn, n, nn.Linear(h, h, bias=False))
            m.moe = nn.Module()
            m.moe.gate = nn.Linear(h, e, bias=False)
            m.moe.shared = nn.Module()
            m.moe.shared.up = nn.Linear(h, i)
            m.moe.shared.down = nn.Linear(i, h)
            experts = []
            for _ in range(e):
                x = nn.Module()
                x.w1, x.w3, x.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
                experts.append(x)
            m.moe.experts = nn.ModuleList(experts)
            return m

        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer() for _ in range(layers)])


def test_module_list_experts():
    d = resolve(parse(TOY, "toy.moedef"))
    with torch.device("meta"):
        model = _Toy()
    plan = compile_plan(d, model, policy="routed", tokens=10)
    (kind,) = plan.kinds
    assert kind.layers == (0, 1, 2)
    s2 = _stage(plan, "moe", 2)
    assert [t.id for t in s2.targets] == ["moe.shared.up", "moe.experts.{e}.w1", "moe.experts.{e}.w3"]
    w1 = s2.targets[1]
    assert (w1.kind, w1.path, w1.role, w1.experts, w1.ckpt) == ("module_list", "moe.experts.{e}.w1", "gate", 4,
                                                                "moe.experts.{e}.w1")
    assert s2.targets[0].bias == "bias" and w1.bias is None
    assert [k.key for k in s2.stats] == ["moe.shared.up:in", "moe.experts.{e}[w1,w3]:in"]
    assert s2.stop_after.kind == "experts_input"  # the experts come after the shared expert in the tree
    s3 = _stage(plan, "moe", 3)
    down = next(t for t in s3.targets if t.role == "down")
    assert down.ckpt == "moe.experts.{e}.down" and down.stats == "moe.experts.{e}.w2:in"
    assert _stage(compile_plan(d, model, policy="all"), "moe", 2).stats[1].key == "moe.experts[w1,w3]:in"


# ---- the table -------------------------------------------------------------------------------------


@pytest.mark.parametrize("xs, text", [((), ""), ((3,), "3"), ((0, 2, 3, 4, 5, 47), "0,2-5,47"),
                                      (range(48), "0-47"), ((5, 1, 2), "1-2,5")])
def test_compress_indices(xs, text):
    assert compress_indices(xs) == text


def test_table_renders_every_golden_arch():
    from rich.console import Console

    for arch in GOLDEN_ARCHS:
        if not (DEFS / f"{arch}.moedef").is_file():
            continue
        plan = plan_for(arch, "routed")
        con = Console(width=200, record=True, file=open(os.devnull, "w"))
        con.print(render(plan))
        text = con.export_text()
        for kind in plan.kinds:
            assert f"layer kind {kind.name}" in text
            for s in kind.stages:
                for t in s.targets:
                    name = t.id.replace("{e}", f"{{0..{t.experts - 1}}}") if t.experts else t.id
                    assert name in text, (arch, name)
        assert len(summary_lines(plan)) == len(plan.kinds)


# ---- the command line ------------------------------------------------------------------------------


def test_schema_plan(capsys):
    assert cli_main(["schema", "plan"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "HookPlan"
    assert {"Stage", "Target", "StatsKey", "CapturePoint", "KindPlan", "Policy"} <= set(schema["$defs"])


def test_plan_defaults_to_the_tiny_config(capsys):
    assert cli_main(["plan", "qwen3_moe", "--policy", "all"]) == 0
    out = capsys.readouterr().out
    assert "layer kind moe" in out and "layer kind dense" in out and "mlp.experts.{0..7}.gate_proj" in out


def test_plan_from_a_model_directory(tmp_path, capsys):
    cfg = json.loads(CONFIG_30B.read_text())
    cfg.update(num_hidden_layers=4, mlp_only_layers=[0], max_window_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["plan", "qwen3_moe", "--model", str(tmp_path), "--json"]) == 0
    plan = HookPlan.model_validate_json(capsys.readouterr().out)
    assert plan.kind("moe").layers == (1, 2, 3) and plan.kind("dense").layers == (0,)


@pytest.mark.parametrize("argv", [
    ["plan", "qwen3_moe", "--policy", "bogus"],
    ["plan", "qwen3_moe", "--tokens", "0"],
    ["plan", "no_such_arch"],
    ["plan", "qwen3_moe", "--config", "/no/such/config.json"],
    ["plan", "qwen3_moe", "--model", "/no/such/dir"],
])
def test_plan_bad_input_exits_2(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_plan_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    assert cli_main(["plan", "qwen3_moe", "--config", str(bad)]) == 2
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert cli_main(["plan", "qwen3_moe", "--config", str(bad)]) == 2
    assert "model_type" in capsys.readouterr().err
