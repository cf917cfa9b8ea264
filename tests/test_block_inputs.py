"""A stage that reads only inside one MoE block, after a stage whose targets all lie inside it, runs the block
alone on the inputs the earlier stage kept (moedsl/execute/block_inputs.py). That must change no weight and no
output: for every library family, a layer quantized with the reuse equals the layer quantized without it, bit for
bit; and the reuse happens where the plan allows it (the experts' down stage after their gate/up stage)."""

from __future__ import annotations

import pytest
import torch

from moedsl.execute.block_inputs import block_for_next_stage
from moedsl.execute.layer import LayerQuantizer
from moedsl.gptq.quantizer import QuantConfig
from moedsl.lang.library import for_model
from moedsl.models.tiny import MOE_TINY, available_tiny, build_model, tiny_config
from moedsl.plan.compiler import compile_plan
from moedsl.plan.schema import Policy
from tests.test_expert_calls import first_moe_layer

FAMILIES = available_tiny(MOE_TINY)


def _quantize(model_type: str, policy: Policy, reuse: bool, chunk_bytes: int | None = None):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu").eval()
    kind, layer, hidden, kwargs = first_moe_layer(model, policy)
    q = LayerQuantizer(kind, layer, QuantConfig(bits=4, group_size=-1), policy, torch.device("cpu"),
                       chunk_bytes=chunk_bytes)
    q.reuse_block_inputs = reuse
    result = q.run(hidden, kwargs)
    return q, kind, layer.state_dict(), result


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy", ["all", "routed"])
def test_running_the_block_alone_changes_no_weight_and_no_output(model_type, policy):
    policy = Policy(kind=policy)
    reused, kind, weights, result = _quantize(model_type, policy, reuse=True)
    plain, _, plain_weights, plain_result = _quantize(model_type, policy, reuse=False)
    assert plain.block_runs == 0
    assert weights.keys() == plain_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], plain_weights[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    for a, b in zip(result.outputs, plain_result.outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the block ran alone for every batch of each stage the plan lets reuse its predecessor's inputs
    reusing = sum(block_for_next_stage(kind, s) is not None for s in kind.stages)
    assert reused.block_runs == reusing * 2, (reused.block_runs, reusing)
    print(f"{model_type} {policy.kind}: {reusing} stage(s) ran the block alone")


def test_the_experts_down_stage_reuses_the_gate_up_stage_inputs():
    """Where the plan allows it: Qwen3's down stage after its gate/up stage; DeepSeek-V3's experts and shared
    down stage after the gate/up stage of both, not its gate/up stage after o_proj (outside the block)."""
    for model_type, reusing in (("qwen3_moe", [2]), ("deepseek_v3", [3]), ("mixtral", [2])):
        model = build_model(tiny_config(model_type), device="meta")
        plan = compile_plan(for_model(model), model, policy=Policy(kind="all"), tokens=64)
        kind = next(k for k in plan.kinds if k.moe)
        assert [s.index for s in kind.stages if block_for_next_stage(kind, s)] == reusing, model_type


def test_inputs_larger_than_the_chunk_bound_are_not_kept():
    q, _, weights, _ = _quantize("qwen3_moe", Policy(kind="all"), reuse=True, chunk_bytes=1024)
    assert q.block_runs == 0
    _, _, plain, _ = _quantize("qwen3_moe", Policy(kind="all"), reuse=False, chunk_bytes=1024)
    assert all(torch.equal(weights[k], plain[k]) for k in weights)


def test_a_block_called_twice_in_one_forward_is_not_stood_in_for():
    """A layer (as remote code might write one) that calls its MoE block twice: one kept call could not replace
    both, so the down stage runs the whole layer, and the result is the same as without the reuse."""
    torch.manual_seed(0)
    model = build_model(tiny_config("qwen3_moe"), device="cpu").eval()
    kind, layer, hidden, kwargs = first_moe_layer(model, Policy(kind="all"))

    class TwiceMoe(type(layer)):
        def forward(self, hidden_states, **kwargs):
            hidden_states = super().forward(hidden_states, **kwargs)
            hidden_states = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
            return hidden_states + 0.5 * self.mlp(self.post_attention_layernorm(hidden_states))

    layer.__class__ = TwiceMoe  # after the inputs were captured: the layers before it are unchanged
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    runs = {}
    for reuse in (True, False):
        layer.load_state_dict(original)
        q = LayerQuantizer(kind, layer, QuantConfig(bits=4, group_size=-1), Policy(kind="all"), torch.device("cpu"))
        q.reuse_block_inputs = reuse
        q.stop_early = False  # both calls run, so both feed the statistics
        q.run(hidden, kwargs)
        runs[reuse] = q.block_runs, {k: v.clone() for k, v in layer.state_dict().items()}
    assert runs[True][0] == 0
    for k, v in runs[True][1].items():
        assert torch.equal(v, runs[False][1][k]), k
