"""`moedsl fmt` on files that are not clean UTF-8 definitions, and `--write` that cannot write."""

from __future__ import annotations

from tests.adversarial.case import REPO, Case, Workspace, either, error, ok, run_cli_unprivileged

GOOD = (REPO / "model_defs" / "qwen3_moe.moedef").read_text()


def _fmt(name, content, *flags):
    def build(ws: Workspace):
        return ["fmt", *flags, str(ws.file(name, content))]
    return build


def _readonly(ws: Workspace):
    f = ws.file("ro.moedef", GOOD.replace("  q_proj:0", "q_proj:0"))
    f.chmod(0o444)
    return ["fmt", "--write", str(f)]


_LATIN1 = GOOD.replace("// Qwen3 MoE", "// Qwen3 MoE caf\u00e9").encode("latin-1")

CASES = [
    Case("fmt-ok", "fmt", _fmt("ok.moedef", GOOD), ok()),
    Case("fmt-not-utf8", "fmt", _fmt("l1.moedef", _LATIN1), error("l1.moedef:1:"), fresh=True),
    Case("fmt-not-utf8-later-line", "fmt", _fmt("l2.moedef", GOOD.encode() + b"// caf\xe9\n"),
         error(f"l2.moedef:{GOOD.count(chr(10)) + 1}:")),
    Case("fmt-lone-surrogate", "fmt", _fmt("s.moedef", GOOD.replace('"mlp.experts.{e}.gate_proj"',
                                                                   '"mlp.experts.{e}.gate\\ud800"')),
         error("s.moedef:")),
    Case("fmt-surrogate-write", "fmt", _fmt("sw.moedef", GOOD.replace('"mlp.experts.{e}.gate_proj"',
                                                                     '"mlp.experts.{e}.\\udcff"'), "--write"),
         error("sw.moedef:")),
    Case("fmt-write-readonly", "fmt", _readonly, error("ro.moedef"), execute=run_cli_unprivileged),
    Case("fmt-missing-file", "fmt", lambda ws: ["fmt", str(ws.root / "none.moedef")], error("none.moedef")),
    Case("fmt-directory", "fmt", lambda ws: ["fmt", str(ws.root)], error(str("directory"))),
    Case("fmt-binary", "fmt", _fmt("bin.moedef", bytes(range(256))), error("bin.moedef")),
    Case("fmt-nul-byte", "fmt", _fmt("nul.moedef", GOOD.replace("arch qwen3_moe", "arch qwen3\x00moe")),
         error("nul.moedef:")),
    Case("fmt-empty", "fmt", _fmt("empty.moedef", ""), error("empty.moedef")),
    Case("fmt-bom", "fmt", _fmt("bom.moedef", "\ufeff" + GOOD), either("bom.moedef")),
    Case("fmt-crlf", "fmt", _fmt("crlf.moedef", GOOD.replace("\n", "\r\n")), either("crlf.moedef")),
    Case("fmt-deep-brackets", "fmt", _fmt("deep.moedef", GOOD + "let x = " + "(" * 100_000 + "1" + ")" * 100_000 + "\n"),
         error("deep.moedef:"), fresh=True),
    Case("fmt-long-number", "fmt", _fmt("num.moedef", GOOD + "let x = " + "9" * 5000 + "\n"), error("num.moedef:")),
]
