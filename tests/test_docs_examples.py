"""Every ```moedef example in docs/language.md is real: it parses, and does what the text says.

* a complete definition (its first statement is `arch`) parses, formats idempotently, and —
  when it has layer kinds — resolves (with the library for `extends`);
* a block after `<!-- error-example: FILE -->` fails, and its rendered error is exactly the
  ```text block that follows it;
* any other block is a snippet of items from an `:experts` block and must parse there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moedsl.errors import MoedslError
from moedsl.lang import library, parser, printer, resolve

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
TEXT = DOC.read_text()
_BLOCK = re.compile(r"(?:<!-- error-example: (?P<file>\S+) -->\n)?```moedef\n(?P<body>.*?)```"
                    r"(?:\n\n```text\n(?P<expected>.*?)```)?", re.S)
BLOCKS = [(TEXT.count("\n", 0, m.start()) + 2, m.group("file"), m.group("body"), m.group("expected"))
          for m in _BLOCK.finditer(TEXT)]


def _is_complete(body: str) -> bool:
    for line in body.splitlines():
        line = line.strip()
        if line and not line.startswith("//"):
            return line.startswith("arch ")
    return False


COMPLETE = [b for b in BLOCKS if b[1] is None and _is_complete(b[2])]
ERRORS = [b for b in BLOCKS if b[1] is not None]
SNIPPETS = [b for b in BLOCKS if b[1] is None and not _is_complete(b[2])]


def test_the_reference_has_examples() -> None:
    assert len(COMPLETE) >= 10 and len(ERRORS) >= 3 and len(SNIPPETS) >= 4


@pytest.mark.parametrize(("line", "file", "body", "expected"), COMPLETE, ids=[f"line{b[0]}" for b in COMPLETE])
def test_complete_definition(line: int, file, body: str, expected) -> None:
    d = parser.parse(body, f"{DOC.name}:{line}")
    once = printer.definition(d)
    assert parser.parse(once) == d
    assert printer.definition(parser.parse(once)) == once
    if d.layers:
        resolved = resolve.resolve(d, library.find)
        assert resolved.header.extends is None


@pytest.mark.parametrize(("line", "file", "body", "expected"), ERRORS, ids=[f"line{b[0]}" for b in ERRORS])
def test_error_example_output_is_real(line: int, file: str, body: str, expected: str) -> None:
    assert expected is not None, "an error example needs a ```text block with its output right after it"
    with pytest.raises(MoedslError) as info:
        resolve.resolve(parser.parse(body, file), library.find)
    assert info.value.render() == expected.rstrip("\n")


@pytest.mark.parametrize(("line", "file", "body", "expected"), SNIPPETS, ids=[f"line{b[0]}" for b in SNIPPETS])
def test_snippet_parses_inside_an_experts_block(line: int, file, body: str, expected) -> None:
    wrapped = "arch snippet\nlayer k otherwise {\n  mlp:moe {\n    experts:experts {\n" + body + "\n    }\n  }\n}\n"
    parser.parse(wrapped, f"{DOC.name}:{line}")


def test_the_canonical_first_example_is_canonical() -> None:
    """The first example is written exactly as `moedsl fmt` prints it."""
    body = COMPLETE[0][2]
    assert printer.definition(parser.parse(body)) == body


def test_precedence_table_matches_the_printer() -> None:
    """The documented operator table (loosest first) is the order the printer (and grammar) binds."""
    from moedsl.lang.printer import _PREC, _UNARY_MINUS

    levels: dict[str, int] = {}
    for level, ops in re.findall(r"^\| (\d+) \| (.*?) \|", TEXT, re.M):
        for op in re.findall(r"`([^`]+)`", ops):
            op = re.sub(r"^a |^-a$| b$| a$", lambda m: "-" if m.group(0) == "-a" else "", op)
            levels[op] = int(level)
    documented = {op: lvl for op, lvl in levels.items() if op in _PREC or op == "-"}
    assert set(_PREC) <= set(documented), set(_PREC) - set(documented)
    ours = dict(_PREC, **{"-": _UNARY_MINUS})
    ranks = sorted(set(ours.values()))
    for op, lvl in documented.items():
        if op == "-" and lvl != documented.get("+"):
            assert lvl == ranks.index(_UNARY_MINUS) + 1, (op, lvl)
        elif op != "-":
            assert lvl == ranks.index(ours[op]) + 1, (op, lvl)
