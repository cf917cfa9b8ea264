"""GPTAQ (moedsl/solvers/gptaq.py): its algebra against the reference column sweep, α = 0 against
GPTQ, the cross statistics the executor carries for it (a full-precision stream beside the quantized
one) under the MoE policies, its effect on a real tiny model's drift from the full-precision model,
and a killed gptaq run resumed byte for byte."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moedsl
from moedsl.errors import MoedslError
from moedsl.execute.layer import LayerQuantizer
from moedsl.execute.run import capture_layer_inputs
from moedsl.gptq.gptq import gptq_quantize, inverse_hessian_factor
from moedsl.gptq.quantizer import QuantConfig, dequantize, group_grids, quantize
from moedsl.plan.schema import Policy, Target
from moedsl.solvers import Problem, resolve_solver, wants_cross
from moedsl.solvers.gptaq import GPTAQ, asymmetry_corrected

RUN_ARGS = ["--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-progress", "--solver", "gptaq"]


def _streams(cols: int, seed: int, n: int = 1):
    """(H, D) of n matrices: X̃ the full-precision inputs X plus an error, both [tokens, cols]."""
    g = torch.Generator().manual_seed(seed)
    Hs, Ds = [], []
    for _ in range(n):
        X = torch.randn(8 * cols, cols, generator=g) * torch.linspace(0.3, 2.0, cols)
        Xq = X + 0.1 * torch.randn(X.shape, generator=g)
        Hs.append(2 / X.shape[0] * Xq.T @ Xq)
        Ds.append(2 / X.shape[0] * (X - Xq).T @ Xq)
    return torch.stack(Hs), torch.stack(Ds)


def _target(out: int, cols: int, i: int = 0) -> Target:
    return Target(id=f"t{i}", kind="linear", path=f"t{i}", in_features=cols, out_features=out, ckpt=f"t{i}", stats="k")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptaq_is_the_reference_column_sweep(act_order):
    """GPTQ on W + W·P equals the paper's sweep (column i's error along U[i, i:], minus its weight along
    P[i, i:], P = α·triu₁(D Uᵀ)·U), written out here column by column on the same grids."""
    cols, rows, alpha = 48, 8, 0.5
    H, D = _streams(cols, 1)
    H, D = H[0], D[0]
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=3, group_size=16, static_groups=True, act_order=act_order)
    corrected = asymmetry_corrected(W[None], H[None], D[None], cfg, alpha)[0]
    ours = gptq_quantize(corrected, H, cfg)

    scales, zeros = group_grids(corrected, cfg)  # static groups: the grids GPTQ fixed up front
    perm = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(cols)
    U, _ = inverse_hessian_factor(H[perm][:, perm], cfg)
    P = alpha * (D[perm][:, perm] @ U.T).triu(1) @ U
    Wp, fp = W[:, perm].clone(), W[:, perm].clone()
    Q = torch.zeros_like(W)
    for i in range(cols):
        g = int(perm[i]) // 16
        w = Wp[:, i].clone()
        Q[:, i] = dequantize(quantize(w, scales[:, g], zeros[:, g], cfg.maxq), scales[:, g], zeros[:, g])
        Wp[:, i:] -= torch.outer((w - Q[:, i]) / U[i, i], U[i, i:]) - torch.outer(fp[:, i], P[i, i:])
    torch.testing.assert_close(ours.weight, Q[:, torch.argsort(perm)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_alpha_zero_is_gptq_exactly(shared, act_order):
    cols, n = 64, 3
    cfg = QuantConfig(bits=3, group_size=32, act_order=act_order, static_groups=act_order)
    H, D = _streams(cols, 3, 1 if shared else n)
    g = torch.Generator().manual_seed(4)
    weights = (torch.randn(n, 16, cols, generator=g), torch.randn(n, 8, cols, generator=g))
    p = Problem(weights, H, (_target(16, cols), _target(8, cols, 1)), tuple(range(n)),
                (512,) if shared else (512,) * n, cfg, cross=D)
    ours, ref = GPTAQ(alpha=0).solve(p), resolve_solver("gptq").solve(p)
    for a_list, b_list in zip(ours, ref):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
            assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    moved = GPTAQ().solve(p)
    assert not torch.equal(moved[0][0].codes, ref[0][0].codes)  # and α > 0 does change the answer


def test_gptaq_lowers_the_asymmetric_objective():
    """What GPTAQ minimises, ‖Q X̃ − W X‖², is lower than GPTQ's on the same inputs."""
    cols = 64
    g = torch.Generator().manual_seed(6)
    X = torch.randn(512, cols, generator=g) * torch.linspace(0.3, 2.0, cols)
    Xq = X + 0.1 * torch.randn(X.shape, generator=g) @ torch.randn(cols, cols, generator=g) / 8
    W = torch.randn(1, 32, cols, generator=g)
    H, D = (2 / 512 * Xq.T @ Xq)[None], (2 / 512 * (X - Xq).T @ Xq)[None]
    p = Problem((W,), H, (_target(32, cols),), (), (512,), QuantConfig(bits=3, group_size=32), cross=D)
    loss = {name: float(((Xq @ resolve_solver(name).solve(p)[0][0].weight.T - X @ W[0].T) ** 2).sum())
            for name in ("gptq", "gptaq")}
    assert loss["gptaq"] < loss["gptq"], loss


def test_names_options_and_what_it_asks_for():
    assert wants_cross(resolve_solver("gptaq")) and wants_cross(resolve_solver("gptaq-mse"))
    assert not any(wants_cross(resolve_solver(n)) for n in ("gptq", "rtn", "mse"))
    assert resolve_solver("gptaq").name == "gptaq" and resolve_solver("gptaq(alpha=0.5)").name == "gptaq(alpha=0.5)"
    assert resolve_solver("gptaq(alpha=0.25)").name == "gptaq"  # the default, named as such
    for spec, needle in (("gptaq(alpha=2)", "alpha must be in [0, 1]"), ("gptaq(beta=1)", "takes the options alpha"),
                         ("rtn(alpha=1)", "takes no options"), ("gptaq(alpha)", "not `option=number`")):
        with pytest.raises(MoedslError) as e:
            resolve_solver(spec)
        assert needle in e.value.render(), spec
    H, D = _streams(32, 0)
    p = Problem((torch.randn(1, 4, 32),), H, (_target(4, 32),), (), (1,), QuantConfig(bits=4, group_size=32))
    with pytest.raises(MoedslError, match="no cross statistics"):
        GPTAQ().solve(p)


# ---- the executor: a full-precision stream, on a real tiny model -------------------------------


def _drift(model, solver: str, policy: str, ids: torch.Tensor) -> tuple[float, dict]:
    """Quantize every layer of a copy of `model` as a run does (3 bits, group 32), carrying the
    full-precision stream; relative squared distance of the last layer's outputs from the model's."""
    m = copy.deepcopy(model)
    plan = moedsl.compile_plan(moedsl.load("qwen3_moe"), m, policy=Policy.parse(policy))
    cpu = torch.device("cpu")
    hidden, kwargs = capture_layer_inputs(m, plan, list(ids.split(2)), cpu, cpu)
    fp = list(hidden)
    seen = {}
    for i in range(plan.num_layers):
        q = LayerQuantizer(plan.kind_for_layer(i), m.model.layers[i], QuantConfig(bits=3, group_size=32), plan.policy,
                           cpu, solver=resolve_solver(solver), index=i, measure_error=False)
        r = q.run(hidden, kwargs[i], fp, kwargs[i])
        hidden, fp = r.outputs, r.fp_outputs
        seen[i] = [t.tokens for s in r.stages for t in s.targets]
    err = sum(float(((a - b) ** 2).sum()) for a, b in zip(hidden, fp)) / sum(float((b ** 2).sum()) for b in fp)
    return err, seen


@pytest.fixture(scope="module")
def fp_model(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("policy", ["routed", "all"])
def test_gptaq_brings_the_model_closer_to_full_precision(fp_model, policy, one_thread):
    """At 3 bits, each layer fitted to the full-precision outputs leaves the last layer's outputs
    nearer the full-precision model's than GPTQ does, under both policies; the statistics see the
    tokens the policy gives them (under `routed`, the quantized model's routing)."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    gptq, seen_gptq = _drift(fp_model, "gptq", policy, ids)
    gptaq, seen_gptaq = _drift(fp_model, "gptaq", policy, ids)
    assert gptaq < 0.8 * gptq, (gptaq, gptq)
    assert seen_gptaq[0] == seen_gptq[0]  # layer 0: both streams start equal, and so does the routing
    if policy == "all":
        assert seen_gptaq == seen_gptq  # every expert sees every token


def test_identical_streams_give_gptq(fp_model, one_thread):
    """In layer 0 both streams are the model's embeddings: the attention's inputs are the same
    tensors, the cross term is exactly zero and q/k/v come out as GPTQ's; the stages after it read
    the already quantized attention, and there the two solvers part."""
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = {}
    for solver in ("gptq", "gptaq"):
        m = copy.deepcopy(fp_model)
        plan = moedsl.compile_plan(moedsl.load("qwen3_moe"), m, policy=Policy.parse("routed"))
        cpu = torch.device("cpu")
        hidden, kwargs = capture_layer_inputs(m, plan, [ids], cpu, cpu)
        LayerQuantizer(plan.kind_for_layer(0), m.model.layers[0], QuantConfig(bits=3, group_size=32), plan.policy, cpu,
                       solver=resolve_solver(solver), index=0, measure_error=False).run(hidden, kwargs[0], hidden,
                                                                                        kwargs[0])
        layers[solver] = m.model.layers[0].state_dict()
    a, q = layers["gptaq"], layers["gptq"]
    qkv = [k for k in a if any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    assert qkv and all(torch.equal(a[k], q[k]) for k in qkv)
    assert any(not torch.equal(a[k], q[k]) for k in a if "mlp" in k or "o_proj" in k)


def test_gptaq_under_auto_and_the_head(default_model, tmp_path):
    report = moedsl.quantize(out=tmp_path / "o", solver="gptaq(alpha=0.5)", policy="auto(min_tokens=8)",
                             quantize_lm_head=True, format="compressed-tensors", group_size=32, samples=4, seq_len=32,
                             progress=False)
    assert report.solver == "gptaq(alpha=0.5)" and report.head["tokens"] == 4 * 32


def test_resume_after_kill_is_byte_identical(tmp_path, default_model, cli):
    """The full-precision stream is part of the resume state: a gptaq run killed after layer 1
    and resumed writes what an uninterrupted run writes."""
    from safetensors import safe_open

    fresh, out = tmp_path / "fresh", tmp_path / "resumed"
    r = cli("quantize", "--out", str(fresh), *RUN_ARGS)  # the same process kind as the runs below: same threads
    assert r.returncode == 0, r.stderr
    r = cli("quantize", "--out", str(out), *RUN_ARGS, "--resume-interval", "0",
            env={"MOEDSL_TEST_STOP": "layer:2:start"})  # SIGKILLs itself
    assert r.returncode == -9, r.stderr
    state = json.loads((out / ".moedsl-run" / "state.json").read_text())
    assert state["finished"] == 2
    with safe_open(out / ".moedsl-run" / state["acts"], "pt") as f:
        assert {"x.0", "fp.x.0"} <= set(f.keys())
        assert not torch.equal(f.get_tensor("x.0"), f.get_tensor("fp.x.0"))  # two streams, parted by layer 2
    r = cli("quantize", "--out", str(out), *RUN_ARGS)
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in fresh.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
