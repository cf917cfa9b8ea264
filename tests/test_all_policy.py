"""Under the `all` policy every expert's statistics see every calibration token, while the MoE
block's output stays the routed output: the statistics hooks observe, they never change the forward."""

from __future__ import annotations

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


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "gpt_oss", "dbrx", "deepseek_v3", "llama4_text"])
def test_all_policy_keeps_block_output_and_counts_every_token(model_type):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), device="cpu")
    model.eval()
    definition = for_model(model)
    plan = compile_plan(definition, model, policy=Policy(kind="all"), tokens=64)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(2)), torch.device("cpu"), torch.device("cpu"))
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    kind = plan.kind_for_layer(i)
    layer = get_path(model, plan.layers_path)[i]
    moe = kind.moe[0]
    block = get_path(layer, moe.path)
    gate_up_stage = next(s for s in kind.stages if any(k.capture.kind == "experts_input" for k in s.stats))

    def block_outputs(run) -> list[torch.Tensor]:
        seen = []
        handle = block.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone()))
        try:
            run()
        finally:
            handle.remove()
        return seen

    with torch.no_grad():
        native = block_outputs(lambda: [layer(x, **kw) for x, kw in zip(hidden, kwargs[i])])
        q = LayerQuantizer(kind, layer, QuantConfig(bits=4, group_size=-1), Policy(kind="all"), torch.device("cpu"))
        q.stop_early = False  # let the hooked forward run to the block's output
        hessians: dict = {}
        hooked = block_outputs(lambda: hessians.update(q.collect(gate_up_stage, hidden, kwargs[i])))
    assert len(native) == len(hooked) == len(hidden)
    for a, b in zip(native, hooked):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the very same computation
    tokens = sum(x.shape[0] * x.shape[1] for x in hidden)
    for key in gate_up_stage.stats:
        if key.capture.kind != "experts_input":
            continue
        counts = hessians[key.key].count
        counts = counts.tolist() if counts.dim() else [int(counts)] * moe.experts.num_experts
        print(f"{model_type}: {key.key}: tokens per expert {counts[:8]}… of {tokens}")
        assert counts == [tokens] * len(counts)
