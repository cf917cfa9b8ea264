"""Definitions that do not fit the model they are used on."""

from __future__ import annotations

from tests.adversarial.case import REPO, Case, error, quantize

BASE = (REPO / "model_defs" / "qwen3_moe.moedef").read_text()


def _def(text):
    def build(ws):
        d = ws.file("d.moedef", text)
        return quantize(ws, ws.model(), "--def", str(d))
    return build


CASES = [
    Case("def-unknown-path", "definition", _def(BASE.replace("    o_proj:1", "    out_proj:1")), error("d.moedef:", "o_proj")),
    Case("def-syntax-error", "definition", _def(BASE.replace("layers model.layers", "layers model..layers")),
         error("d.moedef:")),
    Case("def-weight-not-covered", "definition", _def(BASE.replace("    v_proj:0\n", "")), error("d.moedef", "v_proj")),
    Case("def-empty", "definition", _def(""), error("d.moedef")),
]
