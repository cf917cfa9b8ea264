"""Routed, topk and auto statistics: one padded, batched pass over all experts gives the weights of the
per-expert loop (the unbatched reference path) to fp32 rounding: the padded product sums in another
order, which can move a Hessian entry by an ulp and, rarely, a code by one step."""

from __future__ import annotations

import copy

import pytest
import torch

from moedsl.bind.binder import get_path
from moedsl.execute.layer import LayerQuantizer
from moedsl.execute.run import capture_layer_inputs
from moedsl.gptq.quantizer import QuantConfig
from moedsl.lang.library import for_model
from moedsl.models.tiny import build_model, tiny_config
from moedsl.plan.compiler import compile_plan
from moedsl.plan.schema import Policy


@pytest.mark.parametrize("policy", ["routed", "auto(min_tokens=40)", "topk=3"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_batched_routed_statistics_equal_the_per_expert_loop(model_type, policy):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu")
    model.eval()
    plan = compile_plan(for_model(model), model, policy=policy, tokens=64)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(2)), torch.device("cpu"), torch.device("cpu"))
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    weights, reports = [], []
    for batched in (True, False):
        twin = copy.deepcopy(model)
        layer = get_path(twin, plan.layers_path)[i]
        q = LayerQuantizer(plan.kind_for_layer(i), layer, QuantConfig(bits=4, group_size=-1), Policy.parse(policy),
                           torch.device("cpu"), batched=batched)
        result = q.run(hidden, kwargs[i])
        weights.append(layer.state_dict())
        reports.append([t.tokens for s in result.stages for t in s.targets])
    differing = sum(int((weights[0][n] != weights[1][n]).sum()) for n in weights[0])
    total = sum(weights[0][n].numel() for n in weights[0])
    print(f"{model_type} {policy}: {differing} of {total} weights differ")
    assert differing <= 1e-3 * total
    for name in weights[0]:  # a flipped code moves a weight by one grid step, a small part of its range
        a, b = weights[0][name].float(), weights[1][name].float()
        assert (a - b).abs().max() <= 0.25 * a.abs().max(), name
    assert reports[0] == reports[1]  # exactly the same tokens per expert
