"""Checkpoint-name templates (`ckpt gate "…{e}…"`) that are not a plain `{e}` substitution."""

from __future__ import annotations

from tests.adversarial.case import REPO, Case, error, ok, quantize

BASE = (REPO / "model_defs" / "qwen3_moe.moedef").read_text()
GATE = '"mlp.experts.{e}.gate_proj"'
LINE = next(i for i, l in enumerate(BASE.splitlines(), 1) if GATE in l)
COL = BASE.splitlines()[LINE - 1].index(GATE) + 1


def _def(ws, template):
    return ws.file("bad.moedef", BASE.replace(GATE, template))


def _cmd(template, command):
    def build(ws):
        d = _def(ws, template)
        if command == "quantize":
            return quantize(ws, ws.model(), "--def", str(d))
        if command == "validate":
            return ["validate", str(d), "--model", str(ws.model())]
        if command == "plan":
            return ["plan", str(d), "--model", str(ws.model())]
        return ["fmt", str(d)]
    return build


BAD = {
    "unknown-field": '"mlp.experts.{x}.gate_proj.{e}"',
    "lone-open-brace": '"mlp.experts.{e}.gate_proj{"',
    "lone-close-brace": '"mlp.experts.{e}}.gate_proj"',
    "huge-width": '"mlp.experts.{e:>200000000}.gate_proj"',
    "attribute-access": '"mlp.experts.{e.__class__.__init__.__globals__}.{e}"',
    "index-access": '"mlp.experts.{e[0]}.{e}"',
    "conversion": '"mlp.experts.{e!r}.gate_proj"',
    "positional": '"mlp.experts.{0}.{e}"',
    "empty-field": '"mlp.experts.{}.{e}"',
}

CASES = [Case("template-ok", "template", _cmd(GATE, "quantize"), ok())]
for name, tpl in BAD.items():
    CASES.append(Case(f"template-{name}-quantize", "template", _cmd(tpl, "quantize"), error(f"bad.moedef:{LINE}:")))
for name, command in (("unknown-field", "validate"), ("huge-width", "plan"), ("attribute-access", "fmt")):
    CASES.append(Case(f"template-{name}-{command}", "template", _cmd(BAD[name], command), error(f"bad.moedef:{LINE}:")))
