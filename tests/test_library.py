"""The definition library (`model_defs/*.moedef`): every definition validates against its tiny
model, `for_model` picks the right one, the generated architectures page is up to date, and
each architecture trap the library encodes is caught when the definition gets it wrong.

Cost: validate takes ~2-4 s for the first model (imports), then well under a second per
definition; the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

import moedsl
from moedsl.errors import MoedslError
from moedsl.lang.library import LIBRARY_DIR, for_model, library_files, parse_cached
from moedsl.lang.parser import parse_file
from moedsl.lang.printer import definition as print_definition

DEF_FILES = sorted(LIBRARY_DIR.glob("*.moedef"))
CHECKS = ("structure", "expressions", "expert function", "checkpoint names")

# The families the library must cover (the issue "every MoE family of transformers 5.x as
# .moedef data"): each has a definition or is listed in docs_table.SKIPPED with the reason.
REQUIRED = (
    "deepseek_v3", "gpt_oss", "dbrx", "phi3",
    "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "mixtral", "minimax", "minimax_m2",
    "phimoe", "deepseek_v2", "glm4_moe", "glm4_moe_lite", "dots1", "ernie4_5_moe", "llama4_text",
    "granitemoe", "olmoe", "flex_olmo", "jamba", "hunyuan_v1_moe",
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2",
)


def _validate(path: Path):
    reports = moedsl.validate(path)
    assert reports, f"{path.name}: no model_type checked"
    return reports


def _problems(reports) -> str:
    return "\n".join(p for r in reports for p in r.problems)


def _failed(reports) -> set[str]:
    return {c.name for r in reports for c in r.checks if not c.passed}


# ---- every definition validates ------------------------------------------------------------


def test_library_is_big_enough():
    assert len(DEF_FILES) >= 30


@pytest.mark.parametrize("path", DEF_FILES, ids=[p.stem for p in DEF_FILES])
def test_definition_validates(path: Path):
    from moedsl.models.tiny import available_tiny

    matches = parse_file(path).header.matches
    if matches and not available_tiny(tuple(matches)):
        pytest.skip(f"transformers {transformers.__version__} has none of {list(matches)} (newer model types)")
    reports = _validate(path)
    for r in reports:
        assert r.ok, f"{path.name} on {r.model_type}:\n{_problems(reports)}"
        assert tuple(sorted(c.name for c in r.checks)) == tuple(sorted(CHECKS))
        assert all(c.passed for c in r.checks)


@pytest.mark.parametrize("path", DEF_FILES, ids=[p.stem for p in DEF_FILES])
def test_definition_is_formatted(path: Path):
    assert print_definition(parse_file(path)) == path.read_text(encoding="utf-8"), (
        f"{path.name} is not in canonical form: run `moedsl fmt --write {path}`")


def test_required_families_are_covered_or_explained():
    from moedsl.lang.docs_table import SKIPPED

    matched = {mt for f in library_files() for mt in parse_cached(f).header.matches}
    missing = [mt for mt in REQUIRED if mt not in matched and mt not in SKIPPED]
    assert not missing, f"no definition and no recorded language gap for {missing}"
    assert not (matched & set(SKIPPED)), "a skipped family has a definition after all: drop it from SKIPPED"


def test_architectures_page_is_up_to_date():
    from moedsl.lang.docs_table import DOC_PATH, render

    assert DOC_PATH.is_file(), "docs/architectures.md is missing: run `python -m moedsl.lang.docs_table`"
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/architectures.md is out of date: run `python -m moedsl.lang.docs_table`")


# ---- for_model -----------------------------------------------------------------------------


def _library_matches() -> dict[str, str]:
    out: dict[str, str] = {}
    for f in library_files():
        parsed = parse_cached(f)
        assert parsed.header.matches, f"{f.name} matches no model_type (an `extends` child needs its own `match`)"
        for mt in parsed.header.matches:
            assert mt not in out, f"model_type {mt} is matched by both {out[mt]} and {parsed.header.name}"
            out[mt] = parsed.header.name
    return out


def test_every_model_type_has_exactly_one_definition():
    assert len(_library_matches()) >= 30


@pytest.mark.parametrize("model_type,arch", sorted(_library_matches().items()))
def test_for_model_picks_the_definition(model_type: str, arch: str):
    d = for_model({"model_type": model_type})
    assert d.header.name == arch
    assert d.header.extends is None  # resolved


def test_for_model_takes_a_real_config_and_model():
    from moedsl.models.tiny import build_model, tiny_config

    cfg = tiny_config("mixtral")
    assert for_model(cfg).header.name == "mixtral"
    assert for_model(build_model(cfg, "meta")).header.name == "mixtral"


def test_for_model_unknown_model_type_names_it():
    with pytest.raises(MoedslError) as info:
        for_model({"model_type": "qwen3_moee"})
    text = info.value.render()
    assert "qwen3_moee" in text
    assert "qwen3_moe" in text.replace("qwen3_moee", "")  # the suggestion


def test_for_model_without_model_type():
    with pytest.raises(MoedslError, match="model_type"):
        for_model({"hidden_size": 64})


# ---- the traps: a definition that gets one wrong fails, and says where ------------------------


def _variant(tmp_path: Path, name: str, *replacements: tuple[str, str]) -> Path:
    """`model_defs/NAME.moedef` with text replaced, written under tmp_path (same file name, so
    `extends` still finds the library parents)."""
    text = (LIBRARY_DIR / f"{name}.moedef").read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, f"{name}.moedef no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    out = tmp_path / f"{name}.moedef"
    out.write_text(text, encoding="utf-8")
    return out


def _fails(path: Path, check: str, *needles: str) -> str:
    reports = _validate(path)
    assert not all(r.ok for r in reports), f"{path.name} should not validate"
    assert check in _failed(reports), f"expected the {check!r} check to fail, failed: {_failed(reports)}"
    text = _problems(reports)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


# misspelt paths: a dense MLP Linear, and an expert checkpoint name


def test_misspelt_dense_mlp_path(tmp_path):
    path = _variant(tmp_path, "qwen3_moe", ("  mlp {\n    gate_proj:2\n    up_proj:2", "  mlp {\n    gate_proj:2\n    upe_proj:2"))
    text = _fails(path, "structure", "mlp.upe_proj", "does not exist")
    assert "up_proj" in text.replace("upe_proj", "")  # the suggestion / the uncovered real weight


def test_misspelt_expert_checkpoint_name(tmp_path):
    path = _variant(tmp_path, "qwen3_moe", ('ckpt up "mlp.experts.{e}.up_proj"', 'ckpt up "mlp.experts.{e}.upe_proj"'))
    _fails(path, "checkpoint names", "mlp.experts.0.upe_proj.weight")


def test_misspelt_fused_tensor(tmp_path):
    path = _variant(tmp_path, "qwen3_moe", ("tensor gate_up_proj [E,out,in]", "tensor gate_upe_proj [E,out,in]"))
    _fails(path, "structure", "gate_upe_proj", "gate_up_proj")


# first-k-dense and other dense-layer rules


def test_deepseek_without_dense_layer_rule(tmp_path):
    path = _variant(tmp_path, "deepseek_v3", ("let moe_layer = i >= config.first_k_dense_replace", "let moe_layer = true"))
    _fails(path, "structure", "mlp.gate", "layer 0")


def test_ernie_moe_layer_range(tmp_path):
    path = _variant(tmp_path, "ernie4_5_moe", ("and i >= config.moe_layer_start_index ", ""))
    _fails(path, "structure", "layer 0")


def test_llama4_moe_layers(tmp_path):
    path = _variant(tmp_path, "llama4_text", ("let moe_layer = i in config.moe_layers", "let moe_layer = i % 2 == 0"))
    _fails(path, "structure", "feed_forward")


def test_when_expression_error_is_an_expressions_failure(tmp_path):
    path = _variant(tmp_path, "deepseek_v3", ("i >= config.first_k_dense_replace", "i >= config.first_k_dense_replac"))
    _fails(path, "expressions", "first_k_dense_replac")


# experts layout: fused 3-D, transposed, interleaved, flat 2-D


def test_gpt_oss_concat_instead_of_interleave(tmp_path):
    path = _variant(tmp_path, "gpt_oss", ("interleave(gate, up)", "concat(gate, up)"))
    _fails(path, "expert function", "GptOssExperts")


def test_gpt_oss_untransposed_layout(tmp_path):
    path = _variant(tmp_path, "gpt_oss", ("tensor gate_up_proj [E,in,out]", "tensor gate_up_proj [E,out,in]"),
                    ("tensor down_proj [E,in,out]", "tensor down_proj [E,out,in]"))
    _fails(path, "structure", "transposed")


def test_gpt_oss_plain_silu(tmp_path):
    path = _variant(tmp_path, "gpt_oss", ("fn swiglu_clamped(alpha=1.702, limit=7.0)", "fn glu(silu)"))
    _fails(path, "expert function")


def test_gpt_oss_without_bias(tmp_path):
    path = _variant(tmp_path, "gpt_oss", (" bias gate_up_proj_bias", ""))
    _fails(path, "structure", "gate_up_proj_bias", "neither a target nor skipped")


def test_dbrx_w2_not_transposed(tmp_path):
    path = _variant(tmp_path, "dbrx", ("tensor mlp.w2 [E*in,out]", "tensor mlp.w2 [E*out,in]"))
    _fails(path, "structure", "ffn.experts")


def test_dbrx_flat_tensor_as_3d(tmp_path):
    path = _variant(tmp_path, "dbrx", ("tensor mlp.w1 [E*out,in]", "tensor mlp.w1 [E,out,in]"))
    _fails(path, "structure", "needs a 3-D tensor")


# llama4: routing weights scale the experts' INPUT, and the module takes a stacked input


def test_llama4_scale_output(tmp_path):
    path = _variant(tmp_path, "llama4_text", ("scale input", "scale output"))
    _fails(path, "expert function", "Llama4TextExperts")


def test_llama4_standard_call(tmp_path):
    path = _variant(tmp_path, "llama4_text", ("call(hidden)", "call(hidden, index, weights)"))
    _fails(path, "expert function", "Llama4TextExperts")


# shared experts: gated (qwen2_moe / qwen3_next) and ungated


def test_qwen2_moe_shared_expert_gate_must_be_declared(tmp_path):
    path = _variant(tmp_path, "qwen2_moe", ("    shared_expert_gate:!\n", ""))
    _fails(path, "structure", "shared_expert_gate", "neither a target nor skipped")


def test_qwen3_next_without_shared_expert(tmp_path):
    path = _variant(tmp_path, "qwen3_5_moe", (
        "    shared_expert:moe-share {\n      gate_proj:2\n      up_proj:2\n      down_proj:3\n    }\n", ""))
    _fails(path, "structure", "shared_expert.gate_proj")


# hybrid layers: the mixer per layer, and MoE vs dense on top of it


def test_linear_vs_full_attention_layer_types(tmp_path):
    path = _variant(tmp_path, "qwen3_5_moe", ('let linear = config.layer_types[i] == "linear_attention"',
                                              'let linear = config.layer_types[i] != "full_attention_x"'))
    _fails(path, "structure", "linear_attn", "layer 3")


def test_qwen3_next_dense_layers(tmp_path):
    path = _variant(tmp_path, "qwen3_next", ("let moe_layer = config.num_experts > 0 and not (i in config.mlp_only_layers) and ",
                                             "let moe_layer = config.num_experts > 0 and "))
    _fails(path, "structure", "layer 0")


def test_jamba_attention_vs_mamba(tmp_path):
    path = _variant(tmp_path, "jamba", ("let attention = i % config.attn_layer_period == config.attn_layer_offset",
                                        "let attention = i % config.attn_layer_period == 0"))
    _fails(path, "structure", "mamba")


def test_jamba_x_proj_undeclared(tmp_path):
    path = _variant(tmp_path, "jamba", ("    x_proj:!\n", ""))
    _fails(path, "structure", "mamba.x_proj.weight", "neither a target nor skipped")


def test_jamba_ssm_parameter_undeclared(tmp_path):
    path = _variant(tmp_path, "jamba", ("    A_log:!\n", ""))
    _fails(path, "structure", "mamba.A_log")


def test_minimax_lightning_attention(tmp_path):
    path = _variant(tmp_path, "minimax", ('let linear = config.layer_types[i] == "linear_attention"', "let linear = false"))
    _fails(path, "structure", "self_attn.q_proj", "layer 1")


# routers: raw Parameters, nn.Linear subclasses, wrapped Linears — all must be declared


@pytest.mark.parametrize("name,router,needle", [
    ("hunyuan_v1_moe", "    gate:router\n", "mlp.gate.wg.weight"),  # a wrapped fp32 Linear
    ("phimoe", "    router:router\n", "mlp.router.weight"),  # an nn.Linear subclass
    ("dbrx", "    router:router\n", "ffn.router.layer.weight"),  # Module wrapping `layer`
])
def test_router_must_be_declared(tmp_path, name, router, needle):
    path = _variant(tmp_path, name, (router, ""))
    _fails(path, "structure", needle, "neither a target nor skipped")


def test_router_cannot_take_a_stage(tmp_path):
    path = _variant(tmp_path, "qwen3_moe", ("    gate:router\n", "    gate:2\n"))
    _fails(path, "structure", "not an nn.Linear")


# checkpoint names that differ from the runtime names (and fused checkpoints)


def test_mixtral_runtime_names_are_not_checkpoint_names(tmp_path):
    path = _variant(tmp_path, "mixtral", ('"block_sparse_moe.experts.{e}.w1"', '"mlp.experts.{e}.gate_proj"'))
    _fails(path, "checkpoint names", "mlp.experts.0.gate_proj.weight")


def test_mixtral_w1_w3_swapped_is_caught_by_name_only_when_absent(tmp_path):
    # w2 is down: naming up after w2 still finds a key, so the check cannot see a swap of two
    # existing names; a name that is not in the checkpoint is what it catches
    path = _variant(tmp_path, "mixtral", ('"block_sparse_moe.experts.{e}.w3"', '"block_sparse_moe.experts.{e}.w4"'))
    _fails(path, "checkpoint names", "block_sparse_moe.experts.0.w4.weight")


def test_gpt_oss_checkpoint_is_fused(tmp_path):
    path = _variant(tmp_path, "gpt_oss", ("      ckpt fused\n", ""))
    _fails(path, "checkpoint names", "mlp.experts.0.gate_proj.weight")


def test_llama4_checkpoint_is_fused(tmp_path):
    path = _variant(tmp_path, "llama4_text", ("      ckpt fused\n", ""))
    _fails(path, "checkpoint names", "feed_forward.experts.0.gate_proj.weight")


def test_qwen3_moe_checkpoint_is_not_fused(tmp_path):
    path = _variant(tmp_path, "qwen3_moe", (
        '    ckpt gate "mlp.experts.{e}.gate_proj"\n    ckpt up "mlp.experts.{e}.up_proj"\n'
        '    ckpt down "mlp.experts.{e}.down_proj"\n', "    ckpt fused\n"))
    _fails(path, "checkpoint names", "mlp.experts.gate_up_proj")


# `:?` only where a module really is optional


def test_optional_marker_is_needed_where_modules_are_absent(tmp_path):
    # the tiny glm4_moe config has use_qk_norm=False: no q_norm/k_norm modules
    path = _variant(tmp_path, "glm4_moe", ("    q_norm:!:?\n", "    q_norm:!\n"))
    _fails(path, "structure", "self_attn.q_norm", "does not exist")


def test_mla_without_q_lora_binds(tmp_path):
    # DeepSeek-V2-Lite-shaped config: q_lora_rank=None gives one q_proj instead of q_a/q_b
    from moedsl.bind.binder import bind
    from moedsl.models.tiny import build_model, tiny_config

    cfg = tiny_config("deepseek_v2", q_lora_rank=None)
    bound = bind(moedsl.load("deepseek_v2"), build_model(cfg, "meta"))
    paths = {lin.path for k in bound.kinds for lin in k.linears}
    assert "self_attn.q_proj" in paths and "self_attn.q_a_proj" not in paths


def test_grammar_cache_parses_as_a_fresh_build(tmp_path, monkeypatch, capsys):
    """The analysed grammar kept in the cache gives the same definitions (comments and positions too) as
    a parser built from the grammar; a damaged cache file is rebuilt without a word."""
    from moedsl.lang import parser

    monkeypatch.setenv("MOEDSL_CACHE", str(tmp_path))
    files = [LIBRARY_DIR / f"{n}.moedef" for n in ("qwen3_moe", "deepseek_v3", "gpt_oss", "jamba")]

    def parse_all():
        parser._lark.cache_clear()
        return [parse_file(f).model_dump() for f in files]

    try:
        built = parse_all()  # analyses the grammar and writes the cache
        (cached,) = (tmp_path / "grammar").glob("moedef-*.lark")
        assert parse_all() == built
        assert parser._lark().source_path == "<deserialized>"  # lark loaded it from the cache
        cached.write_bytes(b"damaged")
        assert parse_all() == built
        assert cached.stat().st_size > 1000  # written again
        assert capsys.readouterr().err == ""
    finally:
        parser._lark.cache_clear()  # the other tests use a parser of the session's cache
