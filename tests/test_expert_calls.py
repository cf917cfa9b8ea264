"""A statistics pass skips the routed experts' forward once only a block's shared experts
(`:moe-share`) remain to be captured (moedsl.execute.expert_calls.py). The skip must not change a
single statistic: for every library family with shared experts, every stage's statistics with the
skip equal those of the full forward, bit for bit; and where a shared expert reads the routed
output instead of the block's input, the pass notices and computes the experts after all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moedsl.bind.binder import get_path
from moedsl.errors import MoedslError
from moedsl.execute.layer import LayerQuantizer
from moedsl.execute.run import capture_layer_inputs
from moedsl.gptq.quantizer import QuantConfig
from moedsl.lang.library import for_model
from moedsl.models.tiny import MOE_TINY, available_tiny, build_model, tiny_config
from moedsl.plan.compiler import compile_plan
from moedsl.plan.schema import Policy


def _families() -> tuple[list[str], list[str]]:
    """(families with shared experts, families whose experts are called as call(hidden, index, ...))."""
    shared, chunkable = [], []
    for model_type in available_tiny(MOE_TINY):
        model = build_model(tiny_config(model_type), device="meta")
        plan = compile_plan(for_model(model), model, policy=Policy(kind="all"), tokens=64)
        moes = [m for k in plan.kinds for m in k.moe]
        if any(m.shared for m in moes):
            shared.append(model_type)
        if any(not m.experts.grouped and m.experts.call[:2] == ("hidden", "index") for m in moes):
            chunkable.append(model_type)
    return shared, chunkable


SHARED, CHUNKABLE = _families()


def _hessians(q: LayerQuantizer, stage, hidden, kwargs) -> dict[str, torch.Tensor]:
    out = {}
    for key, h in q.collect(stage, hidden, kwargs).items():
        parts = h.parts.items() if hasattr(h, "parts") else [(0, h)]
        for k, part in parts:
            out[f"{key}/{k}/sum"] = part.sum.clone()
            out[f"{key}/{k}/count"] = torch.as_tensor(part.count).clone()
    return out


def first_moe_layer(model, policy: Policy):
    """The first MoE layer of a tiny model on the CPU: its kind, module, and inputs (4 random sequences of 16
    tokens, in batches of 2) with their keyword arguments."""
    plan = compile_plan(for_model(model), model, policy=policy, tokens=64)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(2)), torch.device("cpu"), torch.device("cpu"))
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    return plan.kind_for_layer(i), get_path(model, plan.layers_path)[i], hidden, kwargs[i]


def _stage_statistics(model, policy: Policy, stop_early: bool):
    """Every stage's statistics of the first MoE layer, and how many expert calls were skipped."""
    kind, layer, hidden, kwargs = first_moe_layer(model, policy)
    q = LayerQuantizer(kind, layer, QuantConfig(bits=4, group_size=-1), policy, torch.device("cpu"))
    q.stop_early = stop_early
    with torch.no_grad():
        stats = [_hessians(q, stage, hidden, kwargs) for stage in kind.stages]
    return stats, q.skipped_expert_calls, layer, kind


def test_the_library_has_families_with_shared_experts_and_chunkable_calls():
    assert {"qwen2_moe", "deepseek_v3", "glm4_moe"} <= set(SHARED)
    assert {"qwen3_moe", "glm4_moe", "deepseek_v3", "mixtral", "gpt_oss"} <= set(CHUNKABLE)


@pytest.mark.parametrize("model_type", SHARED)
@pytest.mark.parametrize("policy", ["all", "routed", "topk", "auto"])
def test_skipping_the_routed_experts_changes_no_statistic(model_type, policy):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu").eval()
    policy = Policy(kind=policy, top_k=3) if policy == "topk" else \
        Policy(kind=policy, min_tokens=40) if policy == "auto" else Policy(kind=policy)
    try:
        skipped, n_skipped, layer, kind = _stage_statistics(model, policy, stop_early=True)
    except MoedslError as err:  # a policy the family refuses (llama4's router-scaled input: routed or all only)
        assert "is not supported for" in str(err) and policy.kind in ("topk", "auto")
        assert not any("forward" in vars(m) for m in model.modules())  # the refusal left no override behind
        return
    full, n_full, _, _ = _stage_statistics(model, policy, stop_early=False)
    assert n_full == 0
    for s, f in zip(skipped, full):
        assert s.keys() == f.keys()
        for k in s:
            torch.testing.assert_close(s[k], f[k], rtol=0, atol=0, msg=lambda m, k=k: f"{model_type} {k}: {m}")
    # the experts' forward is skipped in every stage where a shared target comes after them
    for m in kind.moe:
        assert type(get_path(layer, m.experts.path)).__dict__.get("forward") is not None
        assert "forward" not in vars(get_path(layer, m.experts.path))  # the override is gone after the pass
    print(f"{model_type} {policy}: {n_skipped} expert calls skipped")


@pytest.mark.parametrize("model_type", ["glm4_moe", "deepseek_v3", "llama4_text"])
def test_the_skip_happens_where_shared_experts_run_after_the_routed_ones(model_type):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu").eval()
    _, n_skipped, _, _ = _stage_statistics(model, Policy(kind="all"), stop_early=True)
    assert n_skipped > 0


def test_a_shared_expert_reading_the_routed_output_makes_the_pass_compute_the_experts():
    """A block (as remote code might write one) whose shared expert reads the routed output: zeros
    in its place would change the shared expert's statistics, so the pass must compute them."""
    torch.manual_seed(0)
    model = build_model(tiny_config("glm4_moe"), device="cpu").eval()
    plan = compile_plan(for_model(model), model, policy=Policy(kind="all"), tokens=64)
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    block = get_path(get_path(model, plan.layers_path)[i], plan.kind_for_layer(i).moe[0].path)

    class SharedAfterRouted(type(block)):
        def forward(self, hidden_states):
            shape = hidden_states.shape
            routing = self.gate(hidden_states)  # (logits,) weights, indices: the order differs across versions
            topk_indices = next(t for t in routing if not t.is_floating_point())
            topk_weights = [t for t in routing if t.is_floating_point()][-1]
            routed = self.experts(hidden_states.view(-1, shape[-1]), topk_indices, topk_weights).view(*shape)
            return routed + self.shared_experts(routed)

    block.__class__ = SharedAfterRouted
    skipped, _, _, _ = _stage_statistics(model, Policy(kind="all"), stop_early=True)
    full, _, _, _ = _stage_statistics(model, Policy(kind="all"), stop_early=False)
    for s, f in zip(skipped, full):
        for k in s:
            torch.testing.assert_close(s[k], f[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def _replay_pair(model_type: str, chunk_bytes: int):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu").eval()
    plan = compile_plan(for_model(model), model, policy=Policy(kind="all"), tokens=64)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(2)), torch.device("cpu"), torch.device("cpu"))
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    layer = get_path(model, plan.layers_path)[i]
    with torch.no_grad():
        native = [layer(x, **kw) for x, kw in zip(hidden, kwargs[i])]
        native = [y[0] if isinstance(y, tuple) else y for y in native]
        q = LayerQuantizer(plan.kind_for_layer(i), layer, QuantConfig(bits=4, group_size=-1), Policy(kind="all"),
                           torch.device("cpu"), chunk_bytes=chunk_bytes)
        replayed, _ = q.replay(hidden, kwargs[i])
    return native, replayed, q.replay_split_calls, layer, plan.kind_for_layer(i)


@pytest.mark.parametrize("model_type", CHUNKABLE)
def test_the_replay_in_token_chunks_gives_the_layers_output(model_type):
    """Tiny chunks (a few tokens per call of the experts): every token's output as the layer's own forward
    gives it, and the experts module's forward is its own again afterwards."""
    native, replayed, split, layer, kind = _replay_pair(model_type, chunk_bytes=4 * 1024)
    whole = model_type in ("dbrx",)  # its block calls the experts with [B, S, H] tokens: the call runs whole
    assert split == (0 if whole else len(native))  # every batch's call of the experts ran in chunks
    for a, b in zip(native, replayed):
        torch.testing.assert_close(b, a, rtol=0 if whole else 1e-5, atol=0 if whole else 1e-6)
    for m in kind.moe:
        assert "forward" not in vars(get_path(layer, m.experts.path))


def test_the_replay_runs_whole_calls_below_the_chunk():
    native, replayed, split, _, _ = _replay_pair("qwen3_moe", chunk_bytes=2 << 30)
    assert split == 0
    for a, b in zip(native, replayed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
