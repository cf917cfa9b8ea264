"""Checkpoint-name templates: `ckpt gate "mlp.experts.{e}.gate_proj"`.

A template is plain text with `{e}` (the expert index) in it; nothing else in braces means
anything. It is expanded by substitution, never by `str.format` (which would accept `{x}`,
format specs such as `{e:>200000000}` and attribute access such as `{e.__class__}`).
"""

from __future__ import annotations

import re

FIELDS = ("e",)  # the placeholders a template may use
_PLACEHOLDER = re.compile(r"\{(" + "|".join(FIELDS) + r")\}")


def template_problem(template: str) -> tuple[int, int, str] | None:
    """(0-based offset, length, what is wrong) for the first brace that is not a placeholder, else None."""
    rest = _PLACEHOLDER.sub(lambda m: "\0" * len(m.group(0)), template)
    for i, ch in enumerate(rest):
        if ch == "{":
            close = rest.find("}", i)
            field = template[i + 1: close] if close != -1 else None
            if field is None:
                return i, 1, "`{` opens no placeholder (it is never closed)"
            shown = field if len(field) <= 40 else field[:40] + "…"
            return i, close - i + 1, (f"`{{{shown}}}` is not a placeholder: the only one is `{{e}}` (the expert index); "
                       "format specs, conversions and attribute or index access are not supported")
        if ch == "}":
            return i, 1, "`}` closes no placeholder"
    return None


def expand(template: str, e: int) -> str:
    """The template with every `{e}` replaced by the expert index."""
    return template.replace("{e}", str(int(e)))
