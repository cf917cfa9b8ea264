"""The expression language: what expressions mean, and how evaluation fails (located, never a traceback)."""

from __future__ import annotations

import types

import pytest

from moedsl.errors import MoedslError
from moedsl.lang import ir, parser
from moedsl.lang.expr import MAX_RANGE, Env, Missing, evaluate

CONFIG = {
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0, 3],
    "first_k_dense_replace": 1,
    "moe_layers": None,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
    "ffn_config": {"moe_num_experts": 16},
    "zero": 0,
    "name": "qwen",
    "pair": (1, 2),
}


def parse_expr(src: str, lets: str = "") -> tuple[ir.Expr, dict[str, ir.Expr]]:
    """`src` as the value of the let `x_`, written after all `lets`, starting at column 10."""
    d = parser.parse(f"arch a\n{lets}let x_ = {src}\n", "e.moedef")
    table = {let.name: let.value for let in d.lets}
    return table["x_"], table


def ev(src: str, config=CONFIG, i: int | None = None, lets: str = ""):
    e, table = parse_expr(src, lets)
    return evaluate(e, Env(config, i, table))


def ev_error(src: str, config=CONFIG, i: int | None = None, lets: str = "") -> MoedslError:
    e, table = parse_expr(src, lets)
    with pytest.raises(MoedslError) as info:
        evaluate(e, Env(config, i, table))
    assert info.value.span is not None, info.value.render()
    return info.value


def col_of(src: str, part: str) -> int:
    """The column where `part` starts, `src` being written after `let x_ = ` (9 characters)."""
    return 10 + src.index(part)


# ---- precedence and associativity ---------------------------------------------------------------------


@pytest.mark.parametrize(("src", "value"), [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 - 3 - 2", 5),
    ("10 - (3 - 2)", 9),
    ("2 * 3 % 4", 2),
    ("7 / 2", 3.5),
    ("-2 * 3", -6),
    ("2 - -1", 3),
    ("-(1 + 2)", -3),
    ("2 * config.missing ?? 5", 10),  # `??` binds tighter than `*`
    ("config.missing ?? 2 * 5", 10),
    ("-config.num_experts ?? 1", -128),
    ("1 + 2 == 3", True),
    ("not 1 == 2", True),  # `not` binds looser than comparisons
    ("not true and false", False),
    ("not (true and false)", True),
    ("true or false and false", True),  # `and` binds tighter than `or`
    ("(true or false) and false", False),
    ("1 < 2 and 2 < 3", True),
    ("1 + 1 in [2, 3]", True),
    ("[1, 2, 3][1] * 2", 4),
    ("config.ffn_config.moe_num_experts", 16),
    ("config.mlp_layer_types[-1]", "sparse"),
    ('"ab" + "cd"', "abcd"),
    ('"b" < "c"', True),
    ("config.pair == [1, 2]", True),  # tuples from configs read as lists
    ("1 == 1.0", True),
    ("none == none", True),
])
def test_precedence_and_values(src: str, value) -> None:
    assert ev(src) == value


@pytest.mark.parametrize(("src", "value"), [
    ("len(config.mlp_only_layers)", 2),
    ("len(\"abc\")", 3),
    ("min(3, 1, 2)", 1),
    ("max(config.mlp_only_layers)", 3),
    ("abs(-4)", 4),
    ("floordiv(7, 2)", 3),
    ("floordiv(-7, 2)", -4),
    ("range(4)", [0, 1, 2, 3]),
    ("range(1, 10, 4)", [1, 5, 9]),
    ("int(\"12\") + 1", 13),
    ("int(3.9)", 3),
    ("float(2)", 2.0),
    ("bool(0)", False),
    ("str(12)", "12"),
])
def test_functions(src: str, value) -> None:
    assert ev(src) == value


# ---- `??`: missing or none falls back ----------------------------------------------------------------------


def test_fallback_on_missing_attribute() -> None:
    assert ev("config.num_local_experts ?? config.num_experts") == 128


def test_fallback_on_none() -> None:
    assert ev("config.moe_layers ?? [5]") == [5]


def test_fallback_keeps_falsy_values() -> None:
    assert ev("config.zero ?? 7") == 0
    assert ev("false ?? true") is False


def test_fallback_chains_left_to_right() -> None:
    assert ev("config.a ?? config.b ?? config.ffn_config.moe_num_experts ?? 1") == 16


def test_fallback_on_missing_nested_attribute_and_attribute_of_none() -> None:
    assert ev("config.nothing.deeper ?? 3") == 3
    assert ev("config.moe_layers.first ?? 4") == 4


def test_fallback_on_index_out_of_range() -> None:
    assert ev("config.mlp_layer_types[10] ?? \"dense\"") == "dense"


def test_fallback_does_not_hide_type_errors() -> None:
    err = ev_error('config.name.upper ?? "x"')
    assert "str has no attribute `upper`" in err.render()


def test_missing_without_fallback_is_an_error_with_suggestion() -> None:
    src = "config.num_expert * 2"
    err = ev_error(src)
    assert isinstance(err, Missing)
    assert (err.span.line, err.span.col) == (2, 10)
    text = err.render()
    assert "config has no attribute `num_expert`" in text
    assert "did you mean `num_experts`?" in text


def test_missing_attribute_of_an_object_config_suggests_nearest() -> None:
    class Config:
        attribute_map = {"num_local_experts": "num_experts"}

        def __init__(self) -> None:
            self.num_experts = 8
            self.mlp_only_layers = []

        def to_dict(self) -> dict:
            return dict(self.__dict__)

    err = ev_error("config.mlp_only_layer", config=Config())
    assert err.suggestion == "mlp_only_layers"
    assert ev("config.num_experts", config=Config()) == 8
    assert ev("config.to_dict ?? 3", config=Config()) == 3  # a method is not a config value


def test_config_property_that_raises_is_located() -> None:
    class Config:
        @property
        def broken(self):
            raise RuntimeError("boom")

    err = ev_error("1 + config.broken", config=Config())
    assert "reading config `broken` failed: boom" in err.render()
    assert err.span.col == col_of("1 + config.broken", "config")


def test_namespace_config() -> None:
    cfg = types.SimpleNamespace(num_experts=4, n_routed_experts=None)
    assert ev("config.n_routed_experts ?? config.num_experts", config=cfg) == 4


# ---- `in` and `not in` --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "i", "value"), [
    ("i in config.mlp_only_layers", 3, True),
    ("i in config.mlp_only_layers", 2, False),
    ("i not in config.mlp_only_layers", 2, True),
    ("i in config.moe_layers", 1, False),  # a none list counts as empty
    ("i not in config.moe_layers", 1, True),
    ("i in config.missing ?? []", 1, False),
    ("i in range(0, 10, 2)", 4, True),
    ('"wx" in config.name', None, False),
    ('"wen" in config.name', None, True),
])
def test_membership(src: str, i: int | None, value: bool) -> None:
    assert ev(src, i=i) is value


def test_membership_needs_a_list() -> None:
    src = "i in config.num_experts"
    err = ev_error(src, i=1)
    assert "`in` needs a list on its right, got int" in err.render()
    assert err.span.col == col_of(src, "config")


def test_real_layer_kind_condition() -> None:
    lets = "let moe_layer = not (i in config.mlp_only_layers) and (i + 1) % config.decoder_sparse_step == 0\n"
    kinds = [ev("moe_layer", i=n, lets=lets) for n in range(5)]
    assert kinds == [False, True, True, False, True]


# ---- arithmetic failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["1 / config.zero", "5 % 0", "floordiv(4, config.zero)"])
def test_division_by_zero(src: str) -> None:
    err = ev_error(src)
    assert "division by zero" in err.render()
    assert (err.span.line, err.span.col) == (2, 10)


def test_number_too_large() -> None:
    err = ev_error("4294967296 * 4294967296 * 4294967296")
    assert "number too large" in err.render()


def test_string_too_long() -> None:
    err = ev_error('str(range(10000)) + "x"')
    assert "string too long" in err.render()


# ---- range --------------------------------------------------------------------------------------------------


def test_range_limit() -> None:
    err = ev_error(f"range({MAX_RANGE + 1})")
    assert "too long" in err.render()
    assert len(ev(f"range({MAX_RANGE})")) == MAX_RANGE


def test_range_step_zero() -> None:
    err = ev_error("range(0, 10, 0)")
    assert "step must not be zero" in err.render()


def test_range_argument_count_and_types() -> None:
    assert "1 to 3 arguments" in ev_error("range()").render()
    assert "`range` needs a number, got str" in ev_error('range("3")').render()
    assert "finite" in ev_error("range(1e308 * 10)").render()


# ---- lets ---------------------------------------------------------------------------------------------------


def test_lets_referencing_lets() -> None:
    lets = "let e = config.num_experts\nlet half = e / 2\nlet k = half + e\n"
    assert ev("k * 2", lets=lets) == 384


def test_let_using_the_layer_index_is_evaluated_per_layer() -> None:
    e, table = parse_expr("dense", "let dense = i < config.first_k_dense_replace\n")
    env = Env(CONFIG, None, table)
    assert [evaluate(e, env.at(n)) for n in range(3)] == [True, False, False]
    env = Env(CONFIG, 0, table)  # the same Env, its index changed: no stale value
    assert evaluate(e, env) is True
    env.i = 5
    assert evaluate(e, env) is False


def test_self_referencing_let() -> None:
    err = ev_error("loop + 1", lets="let loop = loop * 2\n")
    assert "`let loop` refers to itself" in err.render()
    assert (err.span.line, err.span.col) == (2, 12)


def test_mutually_referencing_lets() -> None:
    err = ev_error("a", lets="let a = b + 1\nlet b = a + 1\n")
    assert "refers to itself" in err.render()


def test_let_chains_do_not_blow_up() -> None:
    lets = "let a0 = 1\n" + "".join(f"let a{n} = a{n - 1} + a{n - 1}\n" for n in range(1, 41))
    assert ev("a40", i=3, lets=lets) == 2**40


def test_unknown_name_suggests_let() -> None:
    err = ev_error("moe_layr", lets="let moe_layer = true\n")
    assert "unknown name `moe_layr`" in err.render()
    assert err.suggestion == "moe_layer"


def test_layer_index_outside_a_layer() -> None:
    err = ev_error("i + 1")
    assert "`i` (the layer index) has no value here" in err.render()


# ---- type errors are located at the operand that is wrong ------------------------------------------------------


@pytest.mark.parametrize(("src", "part", "words"), [
    ('1 + "a"', '"a"', "`+` needs a number, got str"),
    ('config.name < 3', "config", "`<` needs a number, got str"),
    ("-config.name", "config", "`-` needs a number, got str"),
    ("config.num_experts.count", "config", "int has no attribute `count`"),
    ("not config", "config", "a condition must be true/false, got config"),
    ("config and true", "config", "a condition must be true/false"),
    ("len(3)", "len", "`len` needs a list or string, got int"),
    ("abs(1, 2)", "abs", "`abs` takes 1 argument(s), got 2"),
    ("min([])", "min", "`min` of nothing"),
    ('int("x")', "int", "`int('x')` failed"),
    ("[1, 2][true]", "[1", "cannot index list with bool"),
    ("config[[1]]", "config", "cannot index config with list"),
    ("config.mlp_only_layers + 1", "config", "`+` needs a number, got list"),
])
def test_type_errors_are_located(src: str, part: str, words: str) -> None:
    err = ev_error(src)
    assert words in err.render()
    assert (err.span.line, err.span.col) == (2, col_of(src, part)), err.render()


def test_a_deep_tree_built_in_code_is_an_error_not_a_crash() -> None:
    e: ir.Expr = ir.Literal_(value=1)
    for _ in range(5000):
        e = ir.Unary(op="-", operand=e)
    with pytest.raises(MoedslError, match="nested too deeply"):
        evaluate(e, Env(CONFIG))
