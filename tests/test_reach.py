"""The language's reach (issue 12): the defects found by writing new families as data, numeric
children of ModuleLists, checkpoint roots that differ from runtime roots, and the families
written with them (nemotron_h, granitemoeshared, granitemoehybrid, aria_text).

Every defect test failed before its fix. Models are tiny, built from transformers' own configs;
runs use 4 samples of 32 tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moedsl
from moedsl.cli import main
from moedsl.errors import MoedslError
from moedsl.lang import ir
from moedsl.lang.library import LIBRARY_DIR, load
from moedsl.lang.parser import parse
from moedsl.lang.printer import definition as print_definition
from moedsl.models.tiny import build_model, tiny_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
RUN = dict(group_size=-1, samples=4, seq_len=32, progress=False)


def _doc_example(arch: str) -> str:
    """The ```moedef block of docs/language.md whose `arch` is `arch`."""
    for body in re.findall(r"```moedef\n(.*?)```", DOC.read_text(), re.S):
        if re.search(rf"^arch {arch}$", body, re.M):
            return body
    raise AssertionError(f"docs/language.md has no example `arch {arch}`")


def _keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def _source_names_kept(src: Path, out: Path) -> set[str]:
    """Every output tensor is a source tensor or a quantized form of one (same module name; experts
    fused in the source are written one module per expert, under the fused tensor's parent)."""
    source, written = _keys(src), _keys(out)
    quantized = {k.rsplit(".", 1)[0] for k in written if k.endswith(".qweight")}
    for k in written:
        module, _, leaf = k.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            fused = re.match(r"(.*)\.experts\.\d+\.\w+$", module)  # the MoE block holding the fused tensor
            assert module + ".weight" in source or (fused and any(s.startswith(fused[1] + ".") for s in source)), \
                f"{k}: no `{module}.weight` in the source checkpoint"
        else:
            assert k in source, f"{k} is not a source checkpoint name"
    return quantized


# ---- defect 1: non-finite floats in config.json ---------------------------------------------


@pytest.mark.parametrize("model_type", ["granitemoehybrid", "nemotron_h"])
def test_config_with_infinity_reads_as_transformers_reads_it(model_type, tmp_path, capsys):
    path = tmp_path / "config.json"
    tiny_config(model_type).to_json_file(path)
    assert '"__float__": "Infinity"' in path.read_text()  # transformers' own spelling of inf
    from moedsl.models.source import config_from_file

    assert tuple(config_from_file(path).time_step_limit) == (0.0, float("inf"))
    assert main(["validate", model_type, "--config", str(path)]) == 0
    capsys.readouterr()
    assert main(["plan", model_type, "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == model_type


def test_invalid_config_value_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "config.json"
    tiny_config("granitemoehybrid").to_json_file(path)
    data = json.loads(path.read_text())
    data["time_step_limit"] = ["a", "b"]
    path.write_text(json.dumps(data))
    from moedsl.models.source import config_from_file

    with pytest.raises(MoedslError, match="not a valid `granitemoehybrid` config"):
        config_from_file(path)


# ---- defect 2: the layer-input stand-in presents the real layer's attributes -----------------


def test_layer_input_capture_on_a_model_that_reads_layer_attributes():
    """NemotronHModel.forward picks each layer's mask by `layer.block_type` while calling it."""
    from moedsl.execute.run import capture_layer_inputs
    from moedsl.plan.compiler import compile_plan

    model = build_model(tiny_config("nemotron_h"), "cpu")
    plan = compile_plan("nemotron_h", model, tokens=16)
    ids = torch.arange(16).reshape(2, 8) % 200
    hidden, kwargs = capture_layer_inputs(model, plan, [ids], torch.device("cpu"), torch.device("cpu"))
    assert hidden[0].shape == (2, 8, model.config.hidden_size)
    assert len(kwargs) == plan.num_layers and all(len(k) == 1 for k in kwargs)
    layers = model.model.layers
    assert all(type(l).__name__ == "NemotronHBlock" for l in layers)  # the real layers are back


# ---- defects 3 and 4: keywords as module names ----------------------------------------------

_KEYWORD_AFTER_BRACE = """arch kw
experts 8
top_k 2
layers model.layers

layer moe otherwise {
  mlp:moe {
    gate:router
    shared_experts:moe-share {
      up_proj:0
      down_proj:1
    }
    experts:experts {
      tensor gate_up_proj [E,out,in] concat(gate, up) :0
      tensor down_proj [E,out,in] down :1
      fn glu(silu)
    }
  }
}
"""


def test_experts_block_after_a_closing_brace_parses():
    d = parse(_KEYWORD_AFTER_BRACE)
    moe = d.layers[0].items[0]
    assert [it.names for it in moe.children] == [("gate",), ("shared_experts",), ("experts",)]
    assert parse(print_definition(d)) == d


@pytest.mark.parametrize("word", ["experts", "top_k", "layers", "embed", "lm_head", "match", "carry",
                                  "final_norm", "extends", "arch", "let", "layer", "fragment", "bias"])
def test_header_keyword_names_a_module_after_a_closing_brace(word):
    text = f"arch kw\nlayers model.layers\n\nlayer all otherwise {{\n  mlp {{\n    up_proj:0\n  }}\n" \
           f"  {word}:!\n  {word} {{\n    x:1\n  }}\n  {word}.y:2\n}}\n"
    d = parse(text)
    assert [it.names for it in d.layers[0].items] == [("mlp",), (word,), (word,), (f"{word}.y",)]
    assert print_definition(d) == text


def test_module_named_bias_after_an_annotated_module():
    text = _KEYWORD_AFTER_BRACE.replace("    gate:router\n", "    gate:router\n    bias:!\n")
    d = parse(text)
    assert d.layers[0].items[0].children[1] == ir.Module(names=("bias",), skip=True)
    assert print_definition(d) == text


def test_bias_right_after_a_tensor_is_still_the_tensors_bias():
    text = _KEYWORD_AFTER_BRACE.replace("down :1\n", "down :1 bias down_bias\n")
    tensor = parse(text).layers[0].items[0].children[2].children[1]
    assert isinstance(tensor, ir.FusedTensor) and tensor.bias == "down_bias"


# ---- defect 5: numeric children, per-child stages ---------------------------------------------


@pytest.fixture(scope="module")
def numeric_children_def(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("defs") / "numeric_children_example.moedef"
    path.write_text(_doc_example("numeric_children_example"))
    return path


def test_numeric_children_round_trip():
    text = _doc_example("numeric_children_example")
    d = parse(text)
    assert print_definition(d) == text
    names = [it.names[0] for it in d.layers[0].items]
    assert names == ["input_layernorm", "post_attention_layernorm", "self_attn.0", "mlp", "mlps.0", "self_attn",
                     "mlps"]
    assert d.layers[0].items[5].children[0].names == ("1",)


def test_numeric_children_bind_and_compile_with_their_own_stages(numeric_children_def):
    from moedsl.plan.compiler import compile_plan

    model = build_model(tiny_config("longcat_flash"), "meta")
    plan = compile_plan(load(numeric_children_def), model, policy="all", tokens=64)
    stages = {s.index: [t.id for t in s.targets] for s in plan.kinds[0].stages}
    assert stages[0] == ["self_attn.0.q_a_proj", "self_attn.0.kv_a_proj_with_mqa"]
    assert stages[2] == ["self_attn.0.o_proj"]
    assert stages[3] == ["mlps.0.gate_proj", "mlps.0.up_proj"]
    assert stages[5] == ["self_attn.1.q_a_proj", "self_attn.1.kv_a_proj_with_mqa"]
    assert stages[9] == ["mlps.1.down_proj"]
    keys = {k.key for s in plan.kinds[0].stages for k in s.stats}
    assert "self_attn.0[q_a_proj,kv_a_proj_with_mqa]:in" in keys and "self_attn.1[q_a_proj,kv_a_proj_with_mqa]:in" in keys


def test_a_forgotten_numeric_child_is_reported(tmp_path):
    text = _doc_example("numeric_children_example")
    start = text.index("  mlps {\n    1 {")
    path = tmp_path / "forgot.moedef"
    path.write_text(text[:start] + "}\n")
    (report,) = moedsl.validate(path, model_type="longcat_flash")
    assert not report.ok
    assert any("mlps.1.gate_proj" in p and "neither a target nor skipped" in p for p in report.problems)


def test_numeric_children_quantize_end_to_end(numeric_children_def, tiny_model, tmp_path):
    src = tiny_model("longcat_flash")
    out = tmp_path / "out"
    report = moedsl.quantize(model=src, out=out, definition=str(numeric_children_def), **RUN)
    quantized = _source_names_kept(src, out)
    for i in (0, 1):
        assert {f"model.layers.{i}.self_attn.1.o_proj", f"model.layers.{i}.mlps.0.down_proj"} <= quantized
    assert not any(".mlp." in q for q in quantized)  # the MoE beside them is `:!`
    assert [s["stage"] for s in report.layers[0]["stages"]] == list(range(10))


# ---- defect 7: the group-size note only where a group size helps ------------------------------


def test_out_features_packing_problem_has_no_group_size_note(tiny_model, tmp_path):
    src = tiny_model("qwen2_moe")
    text = (LIBRARY_DIR / "qwen2_moe.moedef").read_text()
    assert "shared_expert_gate:!" in text
    path = tmp_path / "qwen2_moe.moedef"
    path.write_text(text.replace("shared_expert_gate:!", "shared_expert_gate:2"))  # a Linear H -> 1
    with pytest.raises(MoedslError) as info:
        moedsl.quantize(model=src, out=tmp_path / "out", definition=str(path), **{**RUN, "group_size": 16})
    text = info.value.render()
    assert "mlp.shared_expert_gate [1x64]" in text and "out_features 1 is not a multiple of 8" in text
    assert "choose a group size" not in text
    assert "no group size changes this" in text
    assert not (tmp_path / "out" / "config.json").exists()


def test_group_size_problem_keeps_its_note(tiny_model, tmp_path):
    with pytest.raises(MoedslError) as info:
        moedsl.quantize(model=tiny_model("qwen2_moe"), out=tmp_path / "out", **{**RUN, "group_size": 40})
    text = info.value.render()
    assert "choose a group size" in text and "no group size changes this" not in text


# ---- defect 8: a dense variant of a MoE family ------------------------------------------------


def test_dense_variant_of_a_moe_family_validates(tmp_path):
    path = tmp_path / "config.json"
    tiny_config("qwen3_moe", num_experts=0).to_json_file(path)
    (report,) = moedsl.validate("qwen3_moe", config=path)
    assert report.ok, report.problems
    assert report.kinds == {"dense": [0, 1]}


def test_dense_granite_hybrid_quantizes(tiny_model, tmp_path):
    src = tiny_model("granitemoehybrid", num_local_experts=0)
    out = tmp_path / "out"
    report = moedsl.quantize(model=src, out=out, **RUN)
    assert {l["kind"] for l in report.layers} == {"mamba_dense", "attention_dense"}
    quantized = _source_names_kept(src, out)
    assert "model.layers.0.shared_mlp.input_linear" in quantized and "model.layers.1.self_attn.q_proj" in quantized


def test_a_moe_layer_still_needs_a_positive_expert_count(tmp_path):
    path = tmp_path / "config.json"
    tiny_config("qwen3_moe", num_experts=0).to_json_file(path)
    text = (LIBRARY_DIR / "qwen3_moe.moedef").read_text()
    bad = tmp_path / "qwen3_moe.moedef"
    bad.write_text(text.replace("let moe_layer = config.num_experts > 0 and", "let moe_layer ="))
    (report,) = moedsl.validate(bad, config=path)
    assert not report.ok and any("`experts` must be a positive integer" in p for p in report.problems)


# ---- checkpoint roots --------------------------------------------------------------------------


def test_checkpoint_root_round_trips_and_merges():
    text = 'arch r\nlayers model.layers @ "backbone.layers"\n'
    d = parse(text)
    assert d.header.layers_ckpt == "backbone.layers" and print_definition(d) == text
    assert load("nemotron_h").header.layers_ckpt == "backbone.layers"


def test_checkpoint_root_must_be_a_dotted_path():
    with pytest.raises(MoedslError) as info:
        parse('arch r\nlayers model.layers @ "backbone..layers"\n')
    assert info.value.span.line == 2 and "not a dotted path" in info.value.message


def test_wrong_root_is_one_error_at_the_layers_line(tmp_path):
    text = (LIBRARY_DIR / "nemotron_h.moedef").read_text()
    path = tmp_path / "nemotron_h.moedef"
    path.write_text(text.replace('layers model.layers @ "backbone.layers"', "layers model.layers"))
    (report,) = moedsl.validate(path)
    assert not report.ok and len(report.problems) == 1
    problem = report.problems[0]
    assert "under the root `backbone.layers` instead of `model.layers`" in problem
    assert "\n  13 | layers model.layers\n" in problem
    assert 'did you mean `layers model.layers @ "backbone.layers"`?' in problem


def test_root_given_where_the_checkpoint_has_none(tmp_path):
    text = (LIBRARY_DIR / "granitemoe.moedef").read_text()
    path = tmp_path / "granitemoe.moedef"
    path.write_text(text.replace("layers model.layers", 'layers model.layers @ "backbone.layers"'))
    (report,) = moedsl.validate(path)
    assert len(report.problems) == 1 and "under the root `model.layers` instead of `backbone.layers`" \
        in report.problems[0]


def test_nemotron_h_against_its_saved_directory(tiny_model):
    (report,) = moedsl.validate("nemotron_h", model_dir=tiny_model("nemotron_h"))
    assert report.ok, report.problems


# ---- the new library families: quantize under `all` and `routed` -------------------------------

# `routed` runs of every library family are test_quantize.test_every_architecture; here `all` for each
# family this issue added, and both policies where the family brought a new construct
NEW_FAMILIES = ("nemotron_h", "granitemoeshared", "granitemoehybrid", "aria_text", "mellum", "hy_v3", "laguna",
                "sarvam_mla", "minimax_m3_vl_text", "kolibri1", "kimi_linear", "axk2", "bailing_hybrid",
                "dots3_note_text", "longcat_flash")
RUNS = [(mt, "all") for mt in NEW_FAMILIES] + [("nemotron_h", "routed"), ("granitemoehybrid", "routed"),
                                               ("longcat_flash", "routed")]


@pytest.mark.parametrize(("model_type", "policy"), RUNS, ids=[f"{m}-{p}" for m, p in RUNS])
def test_new_family_quantizes(model_type, policy, tiny_model, tmp_path):
    from moedsl.models.tiny import available_tiny

    if not available_tiny((model_type,)):
        pytest.skip(f"this transformers has no `{model_type}` (a newer model type)")
    src = tiny_model(model_type)
    out = tmp_path / "out"
    report = moedsl.quantize(model=src, out=out, policy=policy, **RUN)
    quantized = _source_names_kept(src, out)
    experts = [q for q in quantized if ".experts.0." in q]
    assert experts, f"{model_type}: no expert was quantized"
    for layer in report.layers:
        for s in layer["stages"]:
            assert s["error"] <= s["rtn_error"] * 1.0001 + 1e-12, (model_type, layer["layer"], s["stage"])
    if model_type == "nemotron_h":
        assert all(q.startswith("backbone.layers.") for q in quantized)
        assert not any(k.startswith("model.") for k in _keys(out))
    if model_type == "longcat_flash":
        _check_longcat(src, out, quantized)


def _check_longcat(src: Path, out: Path, quantized: set[str]) -> None:
    """LongCat-Flash: both attentions and both dense MLPs of every layer quantized (numeric children), the E
    routed experts quantized, and the Z identity slots' rows of gate_up (no weights of their own, which vLLM
    refuses) not written under the default engine (test_engines: kept as they are under --engine none)."""
    config = json.loads((src / "config.json").read_text())
    E, Z = config["n_routed_experts"], config["zero_expert_num"]
    assert Z > 0
    for i in range(config["num_layers"]):
        p = f"model.layers.{i}."
        for child in (0, 1):
            assert {f"{p}self_attn.{child}.{m}" for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                          "kv_b_proj", "o_proj")} <= quantized
            assert {f"{p}mlps.{child}.{m}" for m in ("gate_proj", "up_proj", "down_proj")} <= quantized
        assert {f"{p}mlp.experts.{e}.{r}_proj" for e in range(E) for r in ("gate", "up", "down")} <= quantized
        assert not any(q.startswith(f"{p}mlp.experts.{e}.") for e in range(E, E + Z) for q in quantized)
    source = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            source |= {k: fh.get_tensor(k) for k in fh.keys() if ".mlp.experts." in k}
    written = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            written |= {k: fh.get_tensor(k) for k in fh.keys() if ".mlp.experts." in k}
    slot_rows = [k for k in source if any(f".mlp.experts.{e}." in k for e in range(E, E + Z))]
    assert slot_rows and not any(k in written for k in slot_rows)
    assert any(k.startswith("model.layers.0.mlp.experts.0.") for k in written)



def test_a_childs_otherwise_kind_replaces_the_parents():
    d = load("granitemoehybrid")  # extends granitemoeshared (kind `moe otherwise`)
    assert [k.name for k in d.layers] == ["mamba_moe", "mamba_dense", "attention_moe", "attention_dense"]
    assert [k.name for k in load("granitemoeshared").layers] == ["moe"]


# ---- coverage of the installed transformers ----------------------------------------------------


def test_coverage_gives_every_uncovered_moe_type_a_reason(capsys):
    from moedsl.lang import coverage, docs_table

    covered, missing = coverage.report()
    assert {"nemotron_h", "granitemoehybrid", "aria_text", "kimi_linear", "qwen3_moe", "mixtral"} <= set(covered)
    assert not [mt for mt, why in missing.items() if why is None], "MoE model types with no recorded reason"
    assert {"jetmoe", "longcat_flash", "qwen3_vl_moe", "aria", "mistral_large4"} <= set(covered)
    # a composite whose language model cannot be written says so, naming it; a language model inside an
    # uncovered composite points at the composite
    assert "see `inkling2_text`" in missing["inkling2"]
    assert "see `glm5_next`" in missing["glm5_next_text"]
    assert not any("not written" in why or "no way yet" in why for why in missing.values())
    assert not set(covered) & set(coverage.REASONS), "a family with a reason has a definition after all"
    assert docs_table.main(["--coverage"]) == 0
    out = capsys.readouterr().out
    assert f"the library covers {len(covered)}, not {len(missing)}" in out
    assert "  sarvam_moe: checkpoint names:" in out
