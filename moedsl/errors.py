"""The one error type moedsl raises for bad input, and how it is shown.

Every stage (parse, bind, validate, compile, execute, write) reports bad input as a
`MoedslError`. When the problem has a place in a `.moedef` file the error carries a
`Span`, and `render()` shows `file:line:col`, the offending line and a caret under it,
followed by what was expected and the nearest valid name. The CLI prints `render()` and
exits 2; it never prints a traceback for a `MoedslError`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Span:
    """A place in a source text: 1-based line and column, and the length to underline."""

    file: str
    line: int
    col: int
    length: int = 1
    source: str | None = None  # the whole text, so the line can be shown

    def line_text(self) -> str | None:
        if self.source is None:
            return None
        lines = self.source.split("\n")  # as the parser counts lines (`splitlines` also splits at \f, \x1c, ...)
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1].rstrip("\r")
        return ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class MoedslError(Exception):
    """Bad input. `message` says what is wrong; `span` says where, when it has a place."""

    message: str
    span: Span | None = None
    expected: Sequence[str] = ()
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)
    code: str = "error"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        head = f"{self.span}: " if self.span else ""
        out = [f"{head}{self.code}: {self.message}"]
        if self.span is not None:
            text = self.span.line_text()
            if text is not None:
                gutter = f"{self.span.line:>4} | "
                out.append(gutter + text)
                pad = " " * (len(gutter) + max(self.span.col - 1, 0))
                out.append(pad + "^" * max(1, min(self.span.length, max(1, len(text) - self.span.col + 1))))
        if self.expected:
            out.append("  expected: " + ", ".join(self.expected))
        if self.suggestion:
            out.append(f"  did you mean `{self.suggestion}`?")
        for note in self.notes:
            out.append(f"  note: {note}")
        return "\n".join(out)


class MoedslErrors(MoedslError):
    """Several independent problems found in one pass (validate reports them all at once)."""

    def __init__(self, errors: Sequence[MoedslError]):
        self.errors = list(errors)
        super().__init__(message=f"{len(self.errors)} problem(s)")

    def render(self) -> str:
        return "\n\n".join(e.render() for e in self.errors)


def nearest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to `name` (for 'did you mean'), or None when none is close."""
    pool = sorted(set(candidates))
    hits = difflib.get_close_matches(name, pool, n=1, cutoff=cutoff)
    return hits[0] if hits else None
