"""Malformed `.moedef` input: every mistake is a `MoedslError` at the right line and column.

Each test feeds one mistake and checks three things: the exception is a `MoedslError` (never a
Lark or Python exception), its span points at the offending place (1-based line and column, and
the caret in `render()` sits under that column), and the rendered message says what is wrong and,
where there is a near miss, what was meant.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moedsl.errors import MoedslError
from moedsl.lang import library, parser, resolve

FILE = "t.moedef"
HEAD = "arch a\nexperts config.num_experts\ntop_k 2\nlayers model.layers\n"  # 4 lines
EXPERTS = (
    "    experts:experts {\n"
    "      tensor gate_up_proj [E,out,in] concat(gate, up) :1\n"
    "      tensor down_proj [E,out,in] down :2\n"
    "      fn glu(silu)\n"
    "    }\n"
)


def _check(err: MoedslError, line: int, col: int, words: tuple[str, ...], file: str = FILE) -> MoedslError:
    assert type(err) is MoedslError or isinstance(err, MoedslError)
    assert err.span is not None, err.render()
    text = err.render()
    assert (err.span.line, err.span.col) == (line, col), text
    assert text.startswith(f"{file}:{line}:{col}: "), text
    caret_line = text.split("\n")[2]
    assert caret_line.index("^") == len(f"{line:>4} | ") + col - 1, text
    for word in words:
        assert word in text, f"{word!r} not in:\n{text}"
    return err


def parse_error(text: str, line: int, col: int, *words: str) -> MoedslError:
    """`text` must fail to parse, at line:col, with all `words` in the rendered message."""
    with pytest.raises(MoedslError) as info:
        parser.parse(text, FILE)
    return _check(info.value, line, col, words)


def resolve_error(text: str, line: int, col: int, *words: str) -> MoedslError:
    """`text` parses, but `resolve` refuses it at line:col."""
    d = parser.parse(text, FILE)
    with pytest.raises(MoedslError) as info:
        resolve.resolve(d)
    return _check(info.value, line, col, words)


def in_experts(body: str) -> str:
    """An experts block (lines 7.. hold `body`)."""
    return HEAD + "layer k otherwise {\n  mlp:moe {\n    experts:experts {\n" + body + "    }\n  }\n}\n"


# ---- annotations, keywords and words the language knows ---------------------------------------------


def test_unknown_annotation_suggests_moe() -> None:
    err = parse_error("arch a\nlayers x\nlayer k otherwise {\n  mlp:mo3 {}\n}\n", 4, 6,
                      "unknown annotation `:mo3`", "did you mean `:moe`?", ":moe-share")
    assert err.suggestion == ":moe"


def test_repeated_annotation() -> None:
    parse_error("arch a\nlayer k otherwise {\n  q_proj:0:1\n}\n", 3, 11, "annotation `:1` repeats", "stage")


def test_stage_too_large() -> None:
    parse_error("arch a\nlayer k otherwise {\n  q:" + "9" * 5000 + "\n}\n", 3, 4, "too large")


def test_misspelt_item_keyword_tensr() -> None:
    err = parse_error(in_experts("      tensr w [E,out,in] down :1\n"), 8, 7,
                      "unknown keyword `tensr`", "did you mean `tensor`?", "unexpected `[` at 8:15")
    assert err.suggestion == "tensor"


def test_misspelt_statement_keyword_layres() -> None:
    parse_error("arch a\nlayres model.layers\n", 2, 1, "unexpected `layres`", "did you mean `layers`?", "`layer`")


def test_unknown_layout() -> None:
    parse_error(in_experts("      tensor w [E,out] down :1\n"), 8, 16,
                "unknown tensor layout `[E,out]`", "[E,out,in]", "[E*in,out]", "did you mean `[E,out,in]`?")


def test_unknown_split_suggests_concat() -> None:
    parse_error(in_experts("      tensor w [E,out,in] concatt(gate, up) :1\n"), 8, 27,
                "unknown split `concatt`", "interleave(gate, up)", "did you mean `concat`?")


def test_split_names_a_role_twice() -> None:
    parse_error(in_experts("      tensor w [E,out,in] interleave(up, up) :1\n"), 8, 27, "names `up` twice")


def test_unknown_role_in_split_suggests_gate() -> None:
    parse_error(in_experts("      tensor w [E,out,in] concat(gat, up) :1\n"), 8, 34,
                "unknown projection role `gat`", "expected: gate, up, down", "did you mean `gate`?")


def test_unknown_role_after_as_suggests_gate() -> None:
    parse_error(in_experts("      # {\n        w1:1 as gat\n      }\n"), 9, 17,
                "unknown projection role `gat`", "did you mean `gate`?")


def test_fused_tensor_cannot_be_optional() -> None:
    parse_error(in_experts("      tensor w [E,out,in] down :?\n"), 8, 7, "cannot be optional")


def test_fused_tensor_takes_no_role_annotation() -> None:
    parse_error(in_experts("      tensor w [E,out,in] down :router\n"), 8, 32, "unknown annotation `:router`",
                "expected: :0, :1, :!")


def test_unknown_expert_function_glue() -> None:
    parse_error(in_experts("      fn glue(silu)\n"), 8, 10, "unknown expert function `glue`", "did you mean `glu`?",
                "swiglu_clamped")


def test_unknown_activation_sillu() -> None:
    parse_error(in_experts("      fn glu(sillu)\n"), 8, 14, "unknown activation `sillu`", "did you mean `silu`?",
                "relu2")


def test_glu_takes_exactly_one_activation() -> None:
    parse_error(in_experts("      fn mlp(relu2, silu)\n"), 8, 7, "`fn mlp` takes one activation")


def test_swiglu_clamped_missing_limit() -> None:
    parse_error(in_experts("      fn swiglu_clamped(alpha=1.702)\n"), 8, 7,
                "`fn swiglu_clamped` takes `alpha=` and `limit=`", "limit=7.0")


def test_swiglu_clamped_argument_given_twice() -> None:
    parse_error(in_experts("      fn swiglu_clamped(alpha=1.702, alpha=2, limit=7)\n"), 8, 38, "`alpha` is given twice")


def test_swiglu_clamped_argument_not_a_number() -> None:
    parse_error(in_experts("      fn swiglu_clamped(alpha=fast, limit=7)\n"), 8, 25, "`alpha` must be a number")


def test_unknown_scale_word() -> None:
    parse_error(in_experts("      scale outptu\n"), 8, 13, "`scale` is `output` or `input`", "did you mean `output`?")


def test_unknown_call_argument() -> None:
    parse_error(in_experts("      call(hiden, index)\n"), 8, 12, "unknown call argument `hiden`",
                "did you mean `hidden`?")


def test_call_argument_twice() -> None:
    parse_error(in_experts("      call(hidden, index, index)\n"), 8, 27, "names `index` twice")


def test_call_without_hidden() -> None:
    parse_error(in_experts("      call(index, weights)\n"), 8, 7, "must name the `hidden` argument")


def test_ckpt_template_without_expert_index() -> None:
    parse_error(in_experts('      ckpt gate "mlp.experts.gate_proj"\n'), 8, 17, "needs `{e}`")


def test_ckpt_unknown_role() -> None:
    parse_error(in_experts('      ckpt gat "mlp.experts.{e}.w1"\n'), 8, 12, "unknown projection role `gat`",
                "did you mean `gate`?")


# ---- header and top-level structure -------------------------------------------------------------------


def test_duplicate_arch() -> None:
    parse_error("arch a\nlayers x\narch b\n", 3, 1, "`arch` is given twice (first at line 1)")


def test_duplicate_header_statement() -> None:
    parse_error("arch a\nlayers x\ntop_k 2\nlayers y\n", 4, 1, "`layers` is given twice (first at line 2)")


def test_missing_arch() -> None:
    parse_error("// a comment\nlayers model.layers\nlayer k otherwise {}\n", 1, 1, "must start with `arch NAME`",
                "expected: `arch`")


def test_empty_file_has_no_arch() -> None:
    parse_error("", 1, 1, "must start with `arch NAME`")


def test_two_otherwise_kinds() -> None:
    parse_error("arch a\nlayer dense otherwise {}\nlayer other otherwise {}\n", 3, 1,
                "only one layer kind may be `otherwise`")


def test_otherwise_not_last() -> None:
    parse_error("arch a\nlayer dense otherwise {}\nlayer moe when i > 0 {}\n", 2, 1,
                "layer kind `dense` is `otherwise`, so it must come last")


def test_duplicate_layer_kind() -> None:
    parse_error("arch a\nlayer moe when i > 0 {}\nlayer moe otherwise {}\n", 3, 1, "layer kind `moe` is defined twice")


def test_duplicate_let() -> None:
    parse_error("arch a\nlet x = 1\nlet x = 2\n", 3, 1, "let `x` is defined twice")


def test_duplicate_fragment() -> None:
    parse_error("arch a\nfragment f {}\n\nfragment f { q:0 }\n", 4, 1, "fragment `f` is defined twice")


def test_reserved_let_name() -> None:
    parse_error("arch a\nlet config = 3\n", 2, 5, "`config` is reserved")


# ---- lexical and syntax errors --------------------------------------------------------------------------


def test_unterminated_string() -> None:
    parse_error('arch a\nmatch "qwen3_moe\nlayers x\n', 2, 7, "unterminated string")


def test_bad_string_escape() -> None:
    parse_error('arch a\nmatch "qwen\\q"\n', 2, 7, "bad string escape")


def test_unbalanced_brace_missing_close() -> None:
    parse_error("arch a\nlayer k otherwise {\n  mlp {\n    up_proj:1\n}\n", 5, 2, "unexpected end of file", "`}`")


def test_unbalanced_brace_extra_close() -> None:
    parse_error("arch a\nlayer k otherwise {\n  mlp:1\n}\n}\n", 5, 1, "unexpected `}`", "`layer`", "end of file")


def test_unexpected_eof_in_expression() -> None:
    parse_error("arch a\nlet x = 1 +", 2, 12, "unexpected end of file", "a name", "a number")


def test_unexpected_character() -> None:
    parse_error("arch a\nlet x = 1 $ 2\n", 2, 11, "unexpected character '$'", "`??`")


def test_unexpected_token_lists_expected() -> None:
    parse_error("arch a\nlayer k otherwise {\n  q_proj:0 =\n}\n", 3, 12, "unexpected `=`", "an annotation", "`}`")


def test_nul_byte() -> None:
    parse_error("arch a\nlayers model\x00.layers\n", 2, 13, "NUL byte")


def test_brackets_nested_too_deep() -> None:
    parse_error("arch a\nlet x = " + "(" * 70 + "1" + ")" * 70 + "\n", 2, 73, "nested more than 64 deep")


def test_blocks_nested_too_deep() -> None:
    parse_error("arch a\nlayer k otherwise " + "{ m " * 80 + "}" * 81 + "\n", 2, 1 + 18 + 4 * 64, "64 deep")


def test_expression_nested_too_deep() -> None:
    parse_error("arch a\nlet x = " + "not " * 200 + "i\n", 2, 9 + 4 * 101, "nested too deeply")


def test_operator_chain_too_long() -> None:
    parse_error("arch a\nlet x = i" + " + 1" * 500 + "\n", 2, 9, "nested too deeply", "500 operators")


def test_number_literal_too_long() -> None:
    parse_error("arch a\nlet x = 1 + " + "7" * 5000 + "\n", 2, 13, "number literal is too long")


def test_number_too_large() -> None:
    parse_error("arch a\nlet x = 2.5e999\n", 2, 9, "number `2.5e999` is too large")


def test_unknown_function_lenn() -> None:
    parse_error("arch a\nlet n = lenn(config.mlp_only_layers)\n", 2, 9, "unknown function `lenn`",
                "did you mean `len`?", "floordiv")


def test_crlf_positions() -> None:
    parse_error("arch a\r\nlayers x\r\nlet y = 1 + )\r\n", 3, 13, "unexpected `)`")


def test_positions_after_form_feed_line() -> None:
    """Lines are counted by newlines only (as the parser counts them), even after a \\f in a comment."""
    err = parse_error("arch a\n// page\x0cbreak\nlet y = )\n", 3, 9, "unexpected `)`", "let y = )")
    assert err.span.line_text() == "let y = )"


# ---- resolve: fragments, extends, and the structural rules --------------------------------------------


def test_use_of_unknown_fragment_suggests_nearest() -> None:
    resolve_error(HEAD + "fragment attention { q_proj:0 }\nlayer k otherwise {\n  use attentoin\n}\n", 7, 3,
                  "unknown fragment `attentoin`", "did you mean `attention`?")


def test_fragment_that_uses_itself() -> None:
    resolve_error(HEAD + "fragment f {\n  q:0\n  use f\n}\nlayer k otherwise { use f }\n", 7, 3,
                  "fragment `f` uses itself (f → f)")


def test_fragments_that_use_each_other() -> None:
    resolve_error(HEAD + "fragment f { use g }\nfragment g {\n  use f\n}\nlayer k otherwise { use f }\n", 7, 3,
                  "uses itself (f → g → f)")


def test_fragment_expansion_that_explodes() -> None:
    frags = "".join(f"fragment f{n} {{ use f{n + 1} use f{n + 1} }}\n" for n in range(24))
    resolve_error(HEAD + frags + "fragment f24 { q:0 }\nlayer k otherwise { use f0 }\n", 25, 16,
                  "expands to more than 100000 items")


def test_extends_itself() -> None:
    resolve_error("arch a\nextends a\nlayers x\nlayer k otherwise {}\n", 1, 1, "goes round in a circle: a → a")


def test_extends_cycle_through_the_library(tmp_path: Path) -> None:
    (tmp_path / "a.moedef").write_text("arch a\nextends b\nlayers x\nlayer k otherwise {}\n")
    (tmp_path / "b.moedef").write_text("// b\narch b\nextends a\nlayers x\nlayer k otherwise {}\n")
    with pytest.raises(MoedslError) as info:
        library.load(tmp_path / "a.moedef")
    _check(info.value, 2, 1, ("goes round in a circle", "a → b → a"), file=str(tmp_path / "b.moedef"))


def test_extends_unknown_definition_suggests_nearest(tmp_path: Path) -> None:
    path = tmp_path / "mine.moedef"
    path.write_text("arch mine\nextends qwen3_mo\n")
    with pytest.raises(MoedslError) as info:
        library.load(path)
    _check(info.value, 1, 1, ("`mine extends qwen3_mo`", "no definition named `qwen3_mo`",
                              "did you mean `qwen3_moe`?"), file=str(path))


def test_moe_inside_moe() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  mlp:moe {\n    inner:moe {\n" + EXPERTS + "    }\n  }\n}\n", 7, 5,
                  "`inner:moe` is inside another `:moe` block")


def test_tensor_outside_experts() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  mlp {\n    tensor w [E,out,in] down :1\n  }\n}\n", 7, 5,
                  "`tensor` belongs directly inside an `:experts` module")


def test_each_outside_experts() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  mlp {\n    # { w1:1 as gate }\n  }\n}\n", 7, 5,
                  "`#` (one expert of a ModuleList) belongs inside an `:experts` module")


def test_router_outside_moe() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  mlp {\n    gate:router\n  }\n}\n", 7, 5,
                  "`gate:router` must be inside a `:moe` block")


def test_experts_without_fn() -> None:
    resolve_error(in_experts("      tensor w [E,out,in] concat(gate, up) :1\n      tensor d [E,out,in] down :2\n"),
                  7, 5, "must declare its function once", "fn glu(silu)", "found 0")


def test_glu_experts_missing_down() -> None:
    resolve_error(in_experts("      tensor w [E,out,in] concat(gate, up) :1\n      fn glu(silu)\n"), 7, 5,
                  "with `fn glu` needs a `down` projection")


def test_mlp_experts_have_no_gate() -> None:
    resolve_error(in_experts("      tensor w [E,out,in] concat(gate, up) :1\n      tensor d [E,out,in] down :2\n"
                             "      fn mlp(relu2)\n"), 7, 5, "`fn mlp` has no `gate` projection")


def test_tensor_without_stage() -> None:
    resolve_error(in_experts("      tensor w [E,out,in] concat(gate, up)\n      tensor d [E,out,in] down :2\n"
                             "      fn glu(silu)\n"), 8, 7, "tensor `w` needs a stage")


def test_stage_together_with_never_quantize() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  self_attn {\n    q_proj:0:!\n  }\n}\n", 7, 5,
                  "`q_proj` has a stage and `:!`", "choose one")


def test_stage_on_a_module_with_children() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  self_attn:0 {\n    q_proj:0\n  }\n}\n", 6, 3,
                  "`self_attn` has children")


def test_as_role_outside_experts() -> None:
    resolve_error(HEAD + "layer k otherwise {\n  mlp {\n    w1:1 as gate\n  }\n}\n", 7, 5,
                  "`as gate` names a role inside an expert")


def test_unknown_name_suggests_let_name() -> None:
    resolve_error(HEAD + "let moe_layer = i > 0\nlayer moe when moe_layr {\n  q:0\n}\n", 6, 16,
                  "unknown name `moe_layr` in layer moe", "did you mean `moe_layer`?", "i, config, moe_layer")


def test_unknown_name_suggests_config() -> None:
    resolve_error("arch a\nexperts cfg.num_experts\nlayers x\nlayer k otherwise {}\n", 2, 9,
                  "unknown name `cfg` in header", "did you mean `config`?")


def test_unknown_name_suggests_i() -> None:
    resolve_error("arch a\nlayers x\nlet dense = ii < 3\nlayer k otherwise {}\n", 3, 13,
                  "unknown name `ii` in let dense", "did you mean `i`?")


def test_moe_without_experts_expression() -> None:
    resolve_error("arch a\ntop_k 2\nlayers x\nlayer k otherwise {\n  mlp:moe {\n" + EXPERTS + "  }\n}\n", 1, 1,
                  "has a `:moe` block but no `experts` expression")


def test_no_layers_path() -> None:
    resolve_error("arch a\nlayer k otherwise {}\n", 1, 1, "does not say where the decoder layers are",
                  "layers model.layers")


# ---- files and rendering -----------------------------------------------------------------------------


def test_parse_file_missing_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(MoedslError, match="no such file"):
        parser.parse_file(tmp_path / "nope.moedef")
    bad = tmp_path / "bad.moedef"
    bad.write_bytes(b"arch a\nmatch \"\xff\"\n")
    with pytest.raises(MoedslError, match="not UTF-8"):
        parser.parse_file(bad)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(MoedslError, match="expected text"):
        parser.parse(b"arch a")  # type: ignore[arg-type]


def test_render_format() -> None:
    with pytest.raises(MoedslError) as info:
        parser.parse("arch a\nlayers x\nlayer k otherwise {\n  mlp:mo3 {}\n}\n", "defs/mine.moedef")
    assert info.value.render() == (
        "defs/mine.moedef:4:6: error: unknown annotation `:mo3`\n"
        "   4 |   mlp:mo3 {}\n"
        "            ^^^^\n"
        "  expected: :0, :1, :!, :?, :moe, :moe-share, :router, :experts, :grouped\n"
        "  did you mean `:moe`?"
    )


def test_tensor_with_stage_and_never_quantize() -> None:
    resolve_error(in_experts("      tensor w [E,out,in] concat(gate, up) :1 :!\n      tensor d [E,out,in] down :2\n"
                             "      fn glu(silu)\n"), 8, 7, "tensor `w` has a stage and `:!`", "choose one")


def test_tensor_checkpoint_key_needs_ckpt_fused() -> None:
    resolve_error(in_experts('      tensor w [E,out,in] concat(gate, up) :1 @ "mlp.w.weight"\n'
                             "      tensor d [E,out,in] down :2\n      fn glu(silu)\n"), 8, 7,
                  "tensor `w` has a checkpoint key", "needs `ckpt fused`")
