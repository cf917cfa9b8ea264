"""What serving engines load: refusals before any work, and the config names they match on.

The loading itself is checked by scripts/check-serving.sh (`.ci/run` runs it after the suite, `--ci`); these
tests check the run's behaviour on real CLI processes and real checkpoints, without vLLM.
"""

from __future__ import annotations

import json

import pytest
import torch

from moedsl.gptq.quantizer import QuantConfig
from moedsl.write.engines import engine_problems, gptq_module_list, targets_for


@pytest.mark.parametrize("args, words", [
    (["--act-order"], ("desc_act=True) is no longer supported", "--static-groups")),
    (["--asym"], ("sym=False", "compressed-tensors")),
    (["--bits", "3"], ("bits=3",)),
    (["--act-order", "--format", "compressed-tensors"], ("actorder 'group'", "--static-groups")),
])
def test_vllm_refusals_exit_2_before_work(cli, tmp_path, args, words):
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--no-progress", "--samples", "2", "--seq-len", "16", "--engine", "vllm",
            *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "--engine vllm" in r.stderr and "--engine none" in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert not out.exists()


def test_default_engine_warns_before_quantizing_and_writes(cli, tmp_path):
    """Without --engine, what vLLM would not load (3-bit GPTQ, as the quality bench writes) is a warning,
    printed before the first layer and kept in the report; the checkpoint is written. Its quantize_config
    lists the default model's dense-layer gate_up_proj: vLLM matches that fused Linear only by this list."""
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--samples", "2", "--seq-len", "16", "--bits", "3")
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stderr.split())  # rich wraps long lines
    assert "vLLM will not load this checkpoint" in flat and "bits=3" in flat
    assert r.stderr.index("vLLM will not load") < r.stderr.index("layers ")
    report = json.loads((out / "moedsl-report.json").read_text())
    assert any("bits=3" in w and "--engine vllm refuses it" in w for w in report["warnings"])
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    modules = {k.removesuffix(".qweight") for k in index if k.endswith(".qweight")}
    (listed,) = qc["modules_in_block_to_quantize"]  # list[list[str]], as transformers' GPTQConfig has it
    assert "model.layers.0.mlp.gate_up_proj" in listed
    assert modules <= set(listed)


def test_engine_none_checks_nothing_and_writes_asym_gptq_as_v2(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--no-progress", "--samples", "2", "--seq-len", "16", "--bits", "3",
            "--asym", "--engine", "none")
    assert r.returncode == 0, r.stderr
    assert "vLLM" not in r.stderr
    assert not any("vLLM" in w for w in json.loads((out / "moedsl-report.json").read_text())["warnings"])
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["sym"] is False and qc["checkpoint_format"] == "gptq_v2"


def test_asym_compressed_tensors_experts_refused_for_every_engine(cli, tmp_path):
    """The writer stores MoE experts symmetric only: refused before work, not at the first expert."""
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--no-progress", "--samples", "2", "--seq-len", "16", "--asym",
            "--format", "compressed-tensors", "--engine", "none")
    assert r.returncode == 2, r.stderr
    assert "symmetric only" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_static_groups_act_order_is_accepted():
    cfg = QuantConfig(bits=4, group_size=128, act_order=True, static_groups=True)
    assert engine_problems("vllm", "gptq", cfg) == []
    assert engine_problems("vllm", "compressed-tensors", cfg) == []
    assert engine_problems("none", "gptq", QuantConfig(bits=3, sym=False, act_order=True)) == []


def test_module_list_names_fused_runtime_linears():
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
             "model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa",
             "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.down_proj"]
    got = gptq_module_list(names)
    assert "model.layers.0.mlp.gate_up_proj" in got
    assert "model.layers.0.self_attn.fused_qkv_a_proj" in got
    assert "model.layers.1.mlp.experts.0.gate_up_proj" not in got  # its up_proj is not quantized
    assert set(names) <= set(got)
    assert targets_for(["lm_head", "model.layers.0.mlp.gate_proj"]) == ["Linear", "lm_head"]


def test_quantized_lm_head_is_a_compressed_tensors_target(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", "--out", str(out), "--no-progress", "--samples", "2", "--seq-len", "16",
            "--format", "compressed-tensors", "--quantize-lm-head")
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight_packed" in index
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear", "lm_head"]
    assert "lm_head" not in qc["ignore"]


@pytest.mark.parametrize("family, fmt, words", [
    ("gpt_oss", "gptq", ("--format compressed-tensors",)),
    ("jamba", "compressed-tensors", ("mamba mixer", "no quant_config")),  # vllm/.../layers/mamba/mamba_mixer.py
])
def test_family_limits_refused_for_vllm(cli, tiny_model, tmp_path, family, fmt, words):
    src = tiny_model(family)
    r = cli("quantize", "--model", str(src), "--out", str(tmp_path / "out"), "--no-progress", "--samples", "2",
            "--seq-len", "16", "--group-size", "32", "--engine", "vllm", "--format", fmt)
    assert r.returncode == 2, r.stderr
    flat = " ".join(r.stderr.split())
    assert family in flat and "Traceback" not in flat
    for w in words:
        assert w in flat, flat
    assert not (tmp_path / "out").exists()


def _quantized_ct(src, out):
    """`src` quantized to compressed-tensors (written for vLLM): its source tensors, the output's, its config."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    from unpack_reference import read_checkpoint

    from moedsl.execute.run import quantize

    quantize(model=src, out=out, format="compressed-tensors", group_size=32, samples=4, seq_len=16,
             policy="all", progress=False, device="cpu")
    source = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return source, read_checkpoint(out), json.loads((out / "config.json").read_text())["quantization_config"]


def test_gpt_oss_compressed_tensors_experts_stacked_as_vllm_maps_them(tiny_model, tmp_path):
    """vLLM's gpt_oss loader maps `experts.<e>.w13_weight_packed` (gate/up rows interleaved), `w2_*`."""
    source, tensors, qconfig = _quantized_ct(tiny_model("gpt_oss"), tmp_path / "out")
    from unpack_reference import dequantize_ct  # tests/ is on the path now (_quantized_ct)

    layer = "model.layers.0.mlp.experts"
    assert not any(k.startswith(f"{layer}.gate_up_proj") or ".gate_proj." in k for k in tensors)
    assert not any(k.endswith("w13_weight_shape") or k.endswith("w2_weight_shape") for k in tensors)
    gate_up = source[f"{layer}.gate_up_proj"]  # [E, in, 2I], gate at even columns
    bias = source[f"{layer}.gate_up_proj_bias"]  # [E, 2I]
    E, hidden, two_i = gate_up.shape
    for e in range(E):
        stacked = f"{layer}.{e}.w13"
        keys = {f"{stacked}.{local}": tensors[f"{stacked}_{local}"] for local in ("weight_packed", "weight_scale")}
        keys[f"{stacked}.weight_shape"] = torch.tensor([two_i, hidden])
        w13 = torch.from_numpy(dequantize_ct(keys, stacked, qconfig)["weight"]).float()
        gate, up = gate_up[e][:, 0::2].T.float(), gate_up[e][:, 1::2].T.float()
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        assert rel(w13[0::2], gate) < 0.3 < rel(w13[0::2], up)
        assert rel(w13[1::2], up) < 0.3 < rel(w13[1::2], gate)
        assert torch.equal(tensors[f"{stacked}_bias"], bias[e].to(tensors[f"{stacked}_bias"].dtype))
        assert tensors[f"{layer}.{e}.w2_weight_packed"].shape[0] == hidden
        assert f"{layer}.{e}.w2_bias" in tensors


def test_aria_compressed_tensors_experts_as_one_gate_up_matrix_per_expert(tiny_model, tmp_path):
    """vLLM's Aria (LlamaModel.load_weights) renames a per-expert `gate_proj` to `gate_up_proj` and then loads it
    as half of a gate+up matrix: Aria's experts are written as that matrix, gate rows then up rows."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.18"):
        pytest.skip("the tiny-model builder cannot build a shrunk Aria composite on transformers 5.17")
    source, tensors, qconfig = _quantized_ct(tiny_model("aria"), tmp_path / "out")
    from unpack_reference import dequantize_ct  # tests/ is on the path now (_quantized_ct)

    layer = next(k for k in source if k.endswith("layers.0.mlp.experts.fc1.weight")).removesuffix(".fc1.weight")
    fc1, fc2 = source[f"{layer}.fc1.weight"], source[f"{layer}.fc2.weight"]  # [E, H, 2I] gate|up, [E, I, H]
    E, hidden, two_i = fc1.shape
    assert not any(k.startswith(f"{layer}.") and (".gate_proj." in k or ".up_proj." in k) for k in tensors)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for e in range(E):
        w13 = torch.from_numpy(dequantize_ct(tensors, f"{layer}.{e}.gate_up_proj", qconfig)["weight"]).float()
        assert w13.shape == (two_i, hidden)
        gate, up = fc1[e][:, : two_i // 2].T.float(), fc1[e][:, two_i // 2:].T.float()
        assert rel(w13[: two_i // 2], gate) < 0.3 < rel(w13[: two_i // 2], up)
        assert rel(w13[two_i // 2:], up) < 0.3 < rel(w13[two_i // 2:], gate)
        down = torch.from_numpy(dequantize_ct(tensors, f"{layer}.{e}.down_proj", qconfig)["weight"]).float()
        assert rel(down, fc2[e].T.float()) < 0.3


def test_aria_gptq_module_list_as_vllms_prefixes_spell_them():
    """vLLM tests `modules_in_block_to_quantize` by substring against each Linear's prefix, after mapping the
    list through Aria's hf_to_vllm_mapper (`language_model.model` -> `language_model`); it builds the text
    model's Linears as `language_model.model.…` and the shared experts' with no prefix (`.down_proj`)."""
    from moedsl.write.engines import gptq_module_list, gptq_prefixes

    layer = "language_model.model.layers.0"
    quantized = [f"{layer}.self_attn.{p}_proj" for p in "qkvo"] + [
        f"{layer}.mlp.shared_experts.{p}_proj" for p in ("gate", "up", "down")] + [
        f"{layer}.mlp.experts.0.{p}_proj" for p in ("gate", "up", "down")]
    listed = gptq_module_list(quantized, gptq_prefixes("vllm", "aria"))
    mapped = [n.replace("language_model.model", "language_model", 1) for n in listed]  # vLLM's apply_list

    def quantized_in_vllm(prefix: str) -> bool:
        return any(m in prefix for m in mapped)

    assert quantized_in_vllm(f"{layer}.self_attn.q_proj") and quantized_in_vllm(f"{layer}.self_attn.o_proj")
    assert quantized_in_vllm(".gate_proj") and quantized_in_vllm(".up_proj") and quantized_in_vllm(".down_proj")
    for tower in ("vision_tower.encoder.layers.0.self_attn.q_proj", "vision_tower.encoder.layers.0.mlp.fc1",
                  "multi_modal_projector.feed_forward.linear_in", "multi_modal_projector.cross_attn.q_proj"):
        assert not quantized_in_vllm(tower), tower
    assert set(quantized) <= set(listed)  # and still by the checkpoint's names
    assert gptq_module_list(quantized, gptq_prefixes("none", "aria")) == gptq_module_list(quantized)


def _stack(n: int, out: int, cols: int, seed: int):
    import torch

    from moedsl.gptq.quantizer import QuantStack

    g = torch.Generator().manual_seed(seed)
    return QuantStack(codes=torch.randint(0, 16, (n, out, cols), generator=g, dtype=torch.uint8),
                      scales=torch.rand(n, out, 2, generator=g), zeros=torch.full((n, out, 2), 8, dtype=torch.int32),
                      g_idx=(torch.arange(cols, dtype=torch.int32) // (cols // 2)).expand(n, cols).contiguous(),
                      bias=torch.rand(n, out, generator=g))


def test_stacker_pairs_gate_and_up_per_expert_chunk():
    """The stage between quantizer and packer: gate waits for up of the same experts; rows interleave
    as gpt-oss's SwiGLU reads them; down is renamed; other stacks pass unchanged."""
    import torch

    from moedsl.errors import MoedslError
    from moedsl.execute.solving import Quantized
    from moedsl.execute.stacker import ExpertStacker
    from moedsl.write.engines import VLLM_STACKED_EXPERTS

    stacker = ExpertStacker(VLLM_STACKED_EXPERTS["gpt_oss"]["compressed-tensors"], ["mlp.experts"])
    names = lambda role: [f"mlp.experts.{e}.{role}_proj" for e in (2, 3)]  # noqa: E731
    gate, up, down = _stack(2, 4, 8, 0), _stack(2, 4, 8, 1), _stack(2, 8, 4, 2)
    attn = Quantized(["self_attn.q_proj"], _stack(1, 4, 8, 3), False)
    assert [s.q for s in stacker.add(attn)] == [attn]
    assert stacker.add(Quantized(names("up"), up, True)) == []
    (w13,) = stacker.add(Quantized(names("gate"), gate, True))
    assert w13.q.ckpts == ["mlp.experts.2.w13", "mlp.experts.3.w13"] and (w13.join, w13.omit) == ("_", ("weight_shape",))
    assert torch.equal(w13.q.stack.codes[:, 0::2], gate.codes) and torch.equal(w13.q.stack.codes[:, 1::2], up.codes)
    assert torch.equal(w13.q.stack.bias[:, 1::2], up.bias) and torch.equal(w13.q.stack.scales[:, 0::2], gate.scales)
    (w2,) = stacker.add(Quantized(names("down"), down, True))
    assert w2.q.ckpts == ["mlp.experts.2.w2", "mlp.experts.3.w2"] and w2.q.stack is down
    stacker.finish()
    stacker.add(Quantized(names("gate"), gate, True))
    with pytest.raises(MoedslError, match="without its partner"):
        stacker.finish()
    other = _stack(2, 4, 8, 4)
    other.g_idx.zero_()
    with pytest.raises(MoedslError, match="g_idx differ"):  # the gate still waiting, an up of other groups
        stacker.add(Quantized(names("up"), other, True))


@pytest.mark.parametrize("family, runtime_only, checkpoint_only", [
    ("phimoe", "model.layers.0.mlp.router", "model.layers.0.block_sparse_moe.gate"),
    ("kimi_k25", "model.vision_tower.layers.0.attn.k_proj", "vision_tower.encoder.blocks.0.wqkv"),
])
def test_ct_ignore_names_unquantized_linears_as_the_runtime_model_names_them(family, runtime_only, checkpoint_only,
                                                                             tiny_model, tmp_path):
    """transformers + compressed-tensors (and vLLM's Transformers backend) apply the scheme to every runtime
    nn.Linear that `ignore` does not name. phimoe's checkpoint router `block_sparse_moe.gate` is the runtime
    nn.Linear subclass `mlp.router`: named only by its checkpoint name, it was taken for a quantized Linear
    ("'PhimoeTopKRouter' object has no attribute 'weight'"; vLLM: "Output size (8) not supported"). Kimi-K2.5's
    vision `wqkv` is split at load into attn.q_proj, k_proj and v_proj: named as q_proj only, transformers failed
    on the first of the others ("'Linear' object has no attribute 'weight'")."""
    from torch import nn

    from moedsl.execute.loader import LayerwiseLoader
    from moedsl.execute.run import quantize
    from moedsl.models.tiny import build_model, tiny_config

    src = tiny_model(family)
    out = tmp_path / "out"
    quantize(model=src, out=out, format="compressed-tensors", group_size=16, samples=2, seq_len=16, policy="all",
             progress=False, device="cpu")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = {k.removesuffix(".weight_packed") for k in index if k.endswith(".weight_packed")}
    loader = LayerwiseLoader(src)
    loader.skeleton()
    quantized_runtime = {n.removesuffix(".weight") for q in quantized for n in loader.runtime_names(f"{q}.weight")}
    runtime = build_model(tiny_config(family), device="meta")
    linears = [n for n, m in runtime.named_modules() if isinstance(m, nn.Linear)]
    assert runtime_only in linears
    loose = [n for n in linears if n not in quantized_runtime and n not in qc["ignore"]]
    assert loose == [], f"runtime Linears neither quantized nor ignored: {loose}"
    assert checkpoint_only in qc["ignore"]  # vLLM's own classes: checkpoint names
    assert not set(qc["ignore"]) & quantized


def _first_moe_layer(model) -> int:
    return next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))


def _router_bias(model) -> bool:
    mlp = model.model.layers[_first_moe_layer(model)].mlp
    return any(n.endswith("e_score_correction_bias") or n.endswith("expert_bias") for n, _ in mlp.named_buffers())


# family -> (field, value) pairs vLLM reads, checked against the runtime model transformers builds
VLLM_FIELD_FACTS = {
    "glm4_moe": lambda m: {"head_dim": m.model.layers[0].self_attn.head_dim},
    "deepseek_v3": lambda m: {"topk_method": "noaux_tc" if _router_bias(m) else None, "scoring_func": "sigmoid"},
    "deepseek_v32": lambda m: {"topk_method": "noaux_tc" if _router_bias(m) else None, "scoring_func": "sigmoid"},
    "glm_moe_dsa": lambda m: {"topk_method": "noaux_tc" if _router_bias(m) else None, "scoring_func": "sigmoid",
                              "index_topk_pattern": "".join("S" if layer.self_attn.skip_topk else "F"
                                                            for layer in m.model.layers)},
    "longcat_flash": lambda m: {"mla_scale_q_lora": hasattr(m.model.layers[0].self_attn[0], "mla_scale_q_lora"),
                                "mla_scale_kv_lora": hasattr(m.model.layers[0].self_attn[0], "mla_scale_kv_lora"),
                                "zero_expert_type": "identity" if isinstance(
                                    m.model.layers[0].mlp.experts.identity_expert, torch.nn.Identity) else None},
    "glm4_moe_lite": lambda m: {"first_k_dense_replace": _first_moe_layer(m)},
    "hy_v3": lambda m: {"first_k_dense_replace": _first_moe_layer(m),
                        "expert_hidden_dim": m.model.layers[_first_moe_layer(m)].mlp.experts.down_proj.shape[-1],
                        "qk_norm": hasattr(m.model.layers[0].self_attn, "q_norm"), "route_norm": True},
    "afmoe": lambda m: {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1},
    "minimax_m2": lambda m: {"rotary_dim": 2 * m.model.rotary_emb.inv_freq.numel(), "use_routing_bias": _router_bias(m),
                             "scoring_func": "sigmoid"},
}


@pytest.mark.parametrize("family", sorted(VLLM_FIELD_FACTS))
def test_config_gets_the_fields_vllm_reads(family):
    """vLLM's model classes read some fields straight from config.json that transformers' config classes
    drop (e.g. "'Glm4MoeConfig' object has no attribute 'head_dim'"; deepseek_v3 without topk_method:
    "KeyError: 'layers.1.mlp.gate.e_score_correction_bias'"): written for vLLM where absent, with the values
    transformers' runtime model has; left alone under --engine none."""
    from moedsl.models.tiny import build_model, tiny_config
    from moedsl.write.engines import VLLM_CONFIG_FIELDS, engine_config

    config = tiny_config(family).to_dict()
    want = VLLM_FIELD_FACTS[family](build_model(tiny_config(family), device="cpu"))
    assert set(want) == set(VLLM_CONFIG_FIELDS[family])
    assert not any(config.get(k) is not None for k in want), "transformers now saves them: drop the entry"
    written, added = engine_config("vllm", config)
    assert {k: written[k] for k in want} == want
    assert len(added) == len(want)
    assert engine_config("none", config) == (config, [])
    assert engine_config("auto", {**config, **{k: "set" for k in want}})[0] == {**config, **{k: "set" for k in want}}


def test_mimo_v2_flash_config_as_vllm_reads_it():
    """vllm/.../models/mimo_v2.py reads the released MiMo-V2-Flash field names ("'MiMoV2FlashConfig' object has
    no attribute 'hybrid_layer_pattern'"): each written value is checked against the runtime model transformers
    builds, the rope bases by regenerating its inverse frequencies as vLLM's rotary embedding does; and
    transformers reads the written config back as the same model."""
    from transformers import AutoConfig

    from moedsl.models.tiny import build_model, tiny_config
    from moedsl.write.engines import VLLM_CONFIG_FIELDS, engine_config

    config = tiny_config("mimo_v2_flash").to_dict()
    assert not any(config.get(k) is not None for k in VLLM_CONFIG_FIELDS["mimo_v2_flash"])
    written, added = engine_config("vllm", config)
    assert len(added) == len(VLLM_CONFIG_FIELDS["mimo_v2_flash"])
    model = build_model(tiny_config("mimo_v2_flash"), device="cpu")
    layers = model.model.layers
    attn = [layer.self_attn for layer in layers]
    assert written["hybrid_layer_pattern"] == [int(a.sliding_window is not None) for a in attn]
    assert written["moe_layer_freq"] == [int(hasattr(layer.mlp, "experts")) for layer in layers]
    assert written["layernorm_epsilon"] == layers[0].input_layernorm.variance_epsilon
    (swa, *_), (full, *_) = ([a for a in attn if a.sliding_window], [a for a in attn if not a.sliding_window])
    assert (written["swa_num_attention_heads"], written["swa_num_key_value_heads"]) == (
        swa.q_proj.out_features // swa.head_dim, swa.k_proj.out_features // swa.head_dim)
    assert swa.k_proj.out_features != full.k_proj.out_features  # the sliding layers' own kv heads, not the full ones
    assert (written["swa_head_dim"], written["swa_v_head_dim"]) == (swa.head_dim, swa.v_head_dim)
    assert written["sliding_window_size"] + 1 == swa.sliding_window  # vLLM's window, transformers' adds the query
    assert written["add_swa_attention_sink_bias"] is (swa.sinks is not None)
    for kind, theta in (("full_attention", "rope_theta"), ("sliding_attention", "swa_rope_theta")):
        rotary_dim = int(full.head_dim * written["partial_rotary_factor"])
        inv_freq = 1.0 / written[theta] ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)
        assert torch.allclose(inv_freq, getattr(model.model.rotary_emb, f"{kind}_inv_freq"))
    reread = AutoConfig.for_model(**written)
    assert (reread.sliding_window, reread.rope_parameters) == (config["sliding_window"], config["rope_parameters"])


def test_kimi_linear_config_as_vllm_reads_it():
    """vLLM's KimiLinearForCausalLM (vllm/models/kimi_k3) takes its KDA layers from the released
    `linear_attn_config` (1-based; without it every layer is built as MLA and "Kimi-K3 MLA
    (MultiHeadLatentAttention) is NoPE-only" fails): checked against the runtime model transformers builds,
    and transformers reads the written config back as the same model."""
    from transformers import AutoConfig

    from moedsl.models.tiny import build_model, tiny_config
    from moedsl.write.engines import VLLM_CONFIG_FIELDS, engine_config

    config = tiny_config("kimi_linear").to_dict()
    assert not any(config.get(k) is not None for k in VLLM_CONFIG_FIELDS["kimi_linear"])
    written, added = engine_config("vllm", config)
    assert len(added) == len(VLLM_CONFIG_FIELDS["kimi_linear"])
    model = build_model(tiny_config("kimi_linear"), device="cpu")
    delta = [(i + 1, layer.self_attn) for i, layer in enumerate(model.model.layers)
             if hasattr(layer.self_attn, "conv1d")]
    kda = written["linear_attn_config"]
    assert delta and kda["kda_layers"] == [i for i, _ in delta]
    assert kda["full_attn_layers"] == [i + 1 for i in range(len(model.model.layers)) if i + 1 not in kda["kda_layers"]]
    _, attn = delta[0]
    assert (kda["num_heads"], kda["head_dim"], kda["short_conv_kernel_size"]) == (
        attn.num_heads, attn.head_dim, attn.conv1d.kernel_size[0])
    assert written["first_k_dense_replace"] == _first_moe_layer(model)
    assert written["mla_use_nope"] is not any("rotary" in n for n, _ in model.named_modules())
    reread = AutoConfig.for_model(**written)
    assert (reread.layer_types, reread.mlp_layer_types) == (config["layer_types"], config["mlp_layer_types"])


def test_architecture_renamed_where_vllms_class_fits():
    """transformers saves phimoe as `PhimoeForCausalLM`, which vLLM 0.32 does not register (it falls back to
    its Transformers backend); its `PhiMoEForCausalLM` hard-codes the released model's biases."""
    from moedsl.models.tiny import tiny_config
    from moedsl.write.engines import engine_config

    phi = {**tiny_config("phimoe").to_dict(), "architectures": ["PhimoeForCausalLM"]}
    assert engine_config("vllm", phi)[0]["architectures"] == ["PhimoeForCausalLM"]  # no biases: kept
    released = {**phi, "attention_bias": True, "lm_head_bias": True}
    written, added = engine_config("vllm", released)
    assert written["architectures"] == ["PhiMoEForCausalLM"] and "PhiMoEForCausalLM" in added[0]
    assert engine_config("none", released)[0]["architectures"] == ["PhimoeForCausalLM"]
    # transformers' Kimi-K2.5 class name sends vLLM to its Transformers backend, which asks transformers for the
    # torchvision-only image processor; vLLM's own class (the release's name) builds its tower from the config
    kimi = {**tiny_config("kimi_k25").to_dict(), "architectures": ["Kimi_K25ForConditionalGeneration"]}
    assert engine_config("vllm", kimi)[0]["architectures"] == ["KimiK25ForConditionalGeneration"]


def test_unlimited_ocr_config_as_vllm_reads_it():
    """vLLM's Unlimited-OCR config (DeepSeek-VL2's) builds the text model from the release's `language_config`
    (a DeepSeek-V2 config): from transformers' `text_config` it has a dict ("The text_config extracted from the
    model config does not have `num_attention_heads` attribute"). Written in the release's layout, with the
    DeepSeek-V2 fields checked against the runtime model transformers builds; and transformers reads it back as
    the same model."""
    from transformers import AutoConfig

    from moedsl.models.tiny import build_model, tiny_config
    from moedsl.write.engines import engine_config

    model = build_model(tiny_config("unlimited_ocr"), device="cpu")
    config = {**tiny_config("unlimited_ocr").to_dict(), "architectures": [type(model).__name__]}
    written, added = engine_config("vllm", config)
    assert "text_config" not in written and any("language_config" in a for a in added)
    assert written["architectures"] == ["UnlimitedOCRForCausalLM"]
    language = written["language_config"]
    layers = model.model.language_model.layers
    moe = [hasattr(layer.mlp, "experts") for layer in layers]
    assert moe == [i >= language["first_k_dense_replace"] for i in range(len(layers))] and any(moe)
    attn = layers[0].self_attn
    # vLLM's deepseek_v2.py: plain multi-head attention where both MLA head parts are 0 (and no kv latent)
    assert (language["qk_nope_head_dim"], language["qk_rope_head_dim"], language["kv_lora_rank"]) == (0, 0, None)
    assert attn.q_proj.out_features == language["num_attention_heads"] * attn.head_dim
    assert attn.k_proj.out_features == language["num_key_value_heads"] * attn.head_dim
    assert "layer_types" not in language and written["sliding_window"] == config["text_config"]["sliding_window"]
    reread = AutoConfig.for_model(**written)
    before, after = config["text_config"], reread.text_config.to_dict()
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"qk_nope_head_dim", "qk_rope_head_dim", "transformers_version"}  # extra fields it never reads
    shapes = {n: p.shape for n, p in build_model(reread, device="meta").state_dict().items()}
    assert shapes == {n: p.shape for n, p in model.state_dict().items()}
    assert engine_config("vllm", written)[0] == written  # the release's layout is left as it is
    assert engine_config("none", config) == (config, [])


def test_run_writes_the_config_fields(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    out = tmp_path / "out"
    report = quantize_small(src, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert any("topk_method" in a for a in report.config_added)
    assert json.loads((out / "moedsl-report.json").read_text())["config_added"] == report.config_added


def quantize_small(src, out, **options):
    from moedsl.execute.run import quantize

    return quantize(model=src, out=out, format="gptq", group_size=16, samples=2, seq_len=16, progress=False,
                    device="cpu", **options)


def test_weightless_slots_not_written_for_vllm(tiny_model, tmp_path):
    """transformers saves LongCat's zero experts (`extra identity(N)`: no forward reads them) as experts E.. of
    the checkpoint; vLLM maps experts 0..E-1 only and fails on the first ("KeyError:
    'layers.0.mlp.experts.8.gate_proj.weight'"). Written for vLLM they are left out; under --engine none the
    output keeps every tensor the source has."""
    from safetensors import safe_open

    from moedsl.models.tiny import tiny_config

    config = tiny_config("longcat_flash")
    routed, slots = config.n_routed_experts, config.zero_expert_num
    src = tiny_model("longcat_flash")

    def expert_ids(out):
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        return {int(k.split(".experts.")[1].split(".")[0]) for k in index if ".mlp.experts." in k}

    with safe_open(str(next(src.glob("*.safetensors"))), "pt") as f:
        assert {int(k.split(".experts.")[1].split(".")[0]) for k in f.keys() if ".mlp.experts." in k} == set(
            range(routed + slots))
    report = quantize_small(src, tmp_path / "vllm", engine="vllm")
    assert expert_ids(tmp_path / "vllm") == set(range(routed))
    assert [w for w in report.warnings if "weightless router slots" in w]  # said, not silent
    report = quantize_small(src, tmp_path / "none", engine="none")
    assert expert_ids(tmp_path / "none") == set(range(routed + slots))
    assert not [w for w in report.warnings if "weightless router slots" in w]


def test_gptq_module_list_matches_vllms_prefixes(tiny_model, tmp_path):
    """vLLM matches `modules_in_block_to_quantize` against the prefix it builds each Linear with (a substring
    test). granitemoehybrid's mixer is `mamba` in the checkpoint and `….mixer` in vLLM's prefixes
    (vllm/.../models/granitemoehybrid.py): named only as `mamba.in_proj`, vLLM built in_proj unquantized and
    failed with "KeyError: 'layers.0.mamba.in_proj.qweight'"."""
    src = tiny_model("granitemoehybrid")
    out = tmp_path / "out"
    quantize_small(src, out)
    (listed,) = json.loads((out / "quantize_config.json").read_text())["modules_in_block_to_quantize"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    mixers = sorted(k.removesuffix(".qweight") for k in index if ".mamba." in k and k.endswith(".qweight"))
    assert mixers and "model.layers.0.mamba.in_proj" in mixers
    for name in mixers:  # as vLLM's prefix spells it, and still as the checkpoint does
        assert any(m in name.replace(".mamba.", ".mixer.") for m in listed), name
        assert name in listed
