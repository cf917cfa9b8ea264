"""Fuzzing the front end: bad input may only ever raise `MoedslError`.

Random text, random token soup, random bytes, and random mutations (characters, tokens, lines,
truncation) of the shipped `model_defs/`. For each input, `parse` — and `library.load` on the same
text written to a temporary file, which also runs `extends`/`use` resolution and the structural
rules — must either succeed or raise `MoedslError`: never another exception, never a
`RecursionError`, never a hang. Whatever does parse must also print and read back to the same IR.

Every test is derandomized with a fixed `max_examples`, so CI sees the same inputs on every run:
100 per property by default, 500 in the long run (`MOEDSL_LONG_TESTS=1`, tests/long_tests.py).

"In good time" is measured in CPU time of the test's thread, not wall time: an example that takes
seconds of CPU is a hang or a blow-up, while a wall clock also counts the time a busy machine gave to
other processes (which made the old 2 s wall-clock deadline fail at random under load).
"""

from __future__ import annotations

import itertools
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.errors import MoedslError
from moedsl.lang import library, parser, printer
from tests.long_tests import examples

REPO = Path(__file__).resolve().parents[1]
MODEL_DEFS = sorted((REPO / "model_defs").glob("*.moedef"))
SOURCES = [p.read_text() for p in MODEL_DEFS]
PER_EXAMPLE_CPU_S = 2.0  # one parse + resolve of a few-kB file takes milliseconds of CPU; seconds means a hang

# no wall-clock `deadline`: `cpu_bounded` is the hang guard, and it does not fail when the machine is busy
FUZZ = settings(max_examples=examples(100, 500), derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

parser._lark()  # build the parser once, outside any timed example

_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextmanager
def cpu_bounded(what: str):
    """The block must finish within PER_EXAMPLE_CPU_S of this thread's CPU time."""
    start = time.thread_time()
    yield
    used = time.thread_time() - start
    assert used < PER_EXAMPLE_CPU_S, f"{what} took {used:.1f} s of CPU (a hang or a blow-up)"


def check_parse(text: str) -> None:
    """`parse` succeeds (and the result prints back to itself) or raises `MoedslError` — in good time."""
    with cpu_bounded("parse"):
        try:
            d = parser.parse(text, "fuzz.moedef")
        except MoedslError as err:
            err.render()  # rendering an error must not fail either
            d = None
        if d is not None:
            printed = printer.definition(d)
            assert parser.parse(printed, "printed.moedef") == d, printed


def check_load(text: str, workdir: Path) -> None:
    """`library.load` of the text as a file (parse + extends + use + structural rules) fails only cleanly."""
    path = workdir / f"fuzz{next(_counter)}.moedef"
    path.write_text(text, encoding="utf-8")
    with cpu_bounded("library.load"):
        try:
            library.load(path)
        except MoedslError as err:
            err.render()
        finally:
            path.unlink()


# ---- inputs from nothing -------------------------------------------------------------------------

_PUNCT = list("{}()[],.|:#@=+-*/%<>!?\"\\\n\t ") + ["//", "??", "==", "!=", "<=", ">=", ":!", ":?", ":0", ":12",
                                                    ":moe", ":moe-share", ":router", ":experts", ":mo3"]
_WORDS = list(parser.KEYWORDS) + list(parser.FUNCTIONS) + list(parser.FN_FORMS) + [
    "i", "config", "gate", "up", "down", "silu", "gelu", "relu2", "concat", "interleave", "hidden", "index",
    "weights", "output", "input", "E", "out", "in", "E*out", "alpha", "limit", "mlp", "gate_up_proj", "x",
    "model.layers", "0", "1", "7.0", "1e999", "-1", '"a"', '"{e}"', '"', "\x00", "é", "\u2028", "\x0c",
]
tokens = st.one_of(st.sampled_from(_PUNCT), st.sampled_from(_WORDS))
token_soup = st.lists(tokens, max_size=60).map(lambda ts: " ".join(ts))
token_soup_tight = st.lists(tokens, max_size=60).map("".join)


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    check_parse(text)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_files(workdir: Path, data: bytes) -> None:
    """Raw bytes as a file: invalid UTF-8 and NUL bytes are errors with a message, not tracebacks."""
    path = workdir / f"bytes{next(_counter)}.moedef"
    path.write_bytes(data)
    try:
        parser.parse_file(path)
    except MoedslError as err:
        err.render()
    finally:
        path.unlink()
    check_parse(data.decode("latin-1"))


@FUZZ
@given(st.one_of(token_soup, token_soup_tight))
def test_random_token_soup(text: str) -> None:
    check_parse("arch a\n" + text)
    check_parse(text)


@FUZZ
@given(st.one_of(token_soup, token_soup_tight))
def test_random_token_soup_in_a_block(workdir: Path, text: str) -> None:
    """Soup inside an experts block, where most of the item-level checks live."""
    wrapped = ("arch a\nexperts 8\ntop_k 2\nlayers model.layers\nlayer k otherwise {\n  mlp:moe {\n"
               "    experts:experts {\n" + text + "\n    }\n  }\n}\n")
    check_parse(wrapped)
    check_load(wrapped, workdir)


@settings(max_examples=examples(30, 60), derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["(", "[", "{", "not ", "-", "a.", "a[", "x ?? ", "1 + ", "a or "]), st.integers(10, 3000))
def test_deep_input_is_refused_cleanly(opener: str, n: int) -> None:
    closer = {"(": ")", "[": "]", "{": "}", "a[": "0]"}.get(opener, "")
    tail = {"a.": "b", "x ?? ": "y", "1 + ": "1", "a or ": "b", "not ": "x", "-": "x"}.get(opener, "1")
    check_parse("arch a\nlet v = " + opener * n + tail + closer * n + "\n")
    check_parse("arch a\nlayer k otherwise " + "{ m " * n + "}" * (n + 1) + "\n")


# ---- mutations of the real definitions ---------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s+|//[^\n]*|\"(?:[^\"\\\n]|\\.)*\"|:[A-Za-z0-9_!?-]+|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?|\?\?|[=!<>]=|.",
                       re.S)


def _apply(text: str, op: str, where: float, payload: str) -> str:
    if op in ("char_insert", "char_delete", "char_replace"):
        pos = int(where * len(text)) if text else 0
        if op == "char_insert":
            return text[:pos] + payload + text[pos:]
        if op == "char_delete":
            return text[:pos] + text[pos + 1 + len(payload) % 4:]
        return text[:pos] + payload + text[pos + 1:]
    if op.startswith("token_"):
        toks = _TOKEN_RE.findall(text)
        if not toks:
            return payload
        k = min(int(where * len(toks)), len(toks) - 1)
        if op == "token_delete":
            del toks[k]
        elif op == "token_replace":
            toks[k] = payload
        elif op == "token_insert":
            toks.insert(k, payload)
        elif op == "token_duplicate":
            toks.insert(k, toks[k])
        elif op == "token_swap" and k + 2 < len(toks):
            toks[k], toks[k + 2] = toks[k + 2], toks[k]
        return "".join(toks)
    lines = text.split("\n")
    k = min(int(where * len(lines)), len(lines) - 1)
    if op == "line_duplicate":
        lines.insert(k, lines[k])
    elif op == "line_delete":
        del lines[k]
    elif op == "line_swap" and k + 1 < len(lines):
        lines[k], lines[k + 1] = lines[k + 1], lines[k]
    elif op == "truncate":
        return text[: int(where * len(text))]
    return "\n".join(lines)


OPS = ["char_insert", "char_delete", "char_replace", "token_delete", "token_replace", "token_insert",
       "token_duplicate", "token_swap", "line_duplicate", "line_delete", "line_swap", "truncate"]
mutation = st.tuples(st.sampled_from(OPS), st.floats(0, 1), st.one_of(tokens, st.text(min_size=1, max_size=3)))


@st.composite
def mutated_defs(draw) -> str:
    text = draw(st.sampled_from(SOURCES))
    for op, where, payload in draw(st.lists(mutation, min_size=1, max_size=4)):
        text = _apply(text, op, where, payload)
    return text


def test_there_are_definitions_to_mutate() -> None:
    assert SOURCES


@FUZZ
@given(mutated_defs())
def test_mutated_model_defs_parse_or_fail_cleanly(text: str) -> None:
    check_parse(text)


@FUZZ
@given(mutated_defs())
def test_mutated_model_defs_load_or_fail_cleanly(workdir: Path, text: str) -> None:
    check_load(text, workdir)


@pytest.mark.parametrize("path", MODEL_DEFS, ids=[p.name for p in MODEL_DEFS])
def test_every_truncation_of_a_model_def(path: Path) -> None:
    """Cutting a real definition at token boundaries spread over the whole file (every one of them, up to
    300, in the long run) fails cleanly (or still parses)."""
    text = path.read_text()
    cuts = sorted({m.end() for m in _TOKEN_RE.finditer(text)})
    for cut in cuts[:: max(1, len(cuts) // examples(60, 300))]:
        check_parse(text[:cut])
