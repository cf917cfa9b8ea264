"""The `moedsl` command line, run for real: bad input ends in a located message and exit 2, never a traceback.

Most cases call `moedsl.cli.main([...])` in-process (fast) and read stderr with capsys; a few run
`python -m moedsl` in a subprocess to check the real entry point. Expected positions are computed
from the input text (the offending substring), not written down by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moedsl.cli import main

REPO = Path(__file__).resolve().parent.parent
QWEN3 = REPO / "model_defs" / "qwen3_moe.moedef"

HEAD = "arch a\nexperts config.num_experts\ntop_k 2\nlayers model.layers\n"
FUSED = ("      tensor gate_up_proj [E,out,in] concat(gate, up) :1\n"
         "      tensor down_proj [E,out,in] down :2\n")


def in_experts(body: str) -> str:
    """A definition whose only `:experts` block holds `body`."""
    return HEAD + "layer k otherwise {\n  mlp:moe {\n    gate:router\n    experts:experts {\n" + body + "    }\n  }\n}\n"


EOF = object()  # the error is at the end of the input (just after its last non-blank character)


def position(text: str, where) -> tuple[int, int]:
    """1-based (line, col) of `where`: a substring, (substring, n) for its n-th (0-based) occurrence, or EOF."""
    if where is EOF:
        offset = len(text.rstrip())
    else:
        needle, nth = (where, 0) if isinstance(where, str) else where
        offset = -1
        for _ in range(nth + 1):
            offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def check_located(stderr: str, file: Path | str, text: str, line: int, col: int, words: tuple[str, ...] = ()) -> None:
    """stderr is a rendered `MoedslError` at `file:line:col`, with the source line, a caret under `col`, and `words`."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    head = f"{file}:{line}:{col}: "
    starts = [i for i, s in enumerate(lines) if s.startswith(head)]
    assert starts, f"no line starting with {head!r} in:\n{stderr}"
    i = starts[0]
    gutter = f"{line:>4} | "
    source_line = text.split("\n")[line - 1].rstrip("\r")
    assert lines[i + 1] == gutter + source_line, stderr
    caret = lines[i + 2]
    assert set(caret.strip()) == {"^"}, stderr
    assert caret.index("^") == len(gutter) + col - 1, stderr
    for word in words:
        assert word in stderr, f"{word!r} not in:\n{stderr}"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "moedsl", *[str(a) for a in argv]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- 1. malformed definitions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    where: object  # see `position`
    words: tuple[str, ...]
    command: str = "fmt"  # `fmt` only parses; `validate` also resolves (fragments, extends, structure, names)


CASES = [
    # syntax
    Case("unexpected-token", "arch a\nlayer k otherwise {\n  q_proj:0 =\n}\n", "=",
         ("syntax error: unexpected `=`", "expected:", "`}`", "an annotation")),
    Case("unexpected-character", "arch a\nlet x = 1 $ 2\n", "$", ("unexpected character '$'", "`??`")),
    Case("unterminated-string", 'arch a\nmatch "qwen3_moe\nlayers x\n', '"qwen3_moe', ("unterminated string",)),
    Case("bad-string-escape", 'arch a\nmatch "qwen\\q"\n', '"qwen\\q"', ("bad string escape",)),
    Case("unbalanced-brace-missing-close", "arch a\nlayer k otherwise {\n  mlp {\n    up_proj:1\n}\n", EOF,
         ("unexpected end of file", "expected:", "`}`")),
    Case("unbalanced-brace-extra-close", "arch a\nlayer k otherwise {\n  mlp:1\n}\n}\n", ("}", 1),
         ("unexpected `}`", "expected:", "`layer`", "end of file")),
    Case("eof-in-expression", "arch a\nlet x = 1 +", EOF, ("unexpected end of file", "a name", "a number")),
    Case("nul-byte", "arch a\nlayers model\x00.layers\n", "\x00", ("NUL byte",)),
    Case("misspelt-keyword", in_experts("      tensr w [E,out,in] down :1\n"), "tensr",
         ("unknown keyword `tensr`", "did you mean `tensor`?")),
    Case("nesting-too-deep", "arch a\nlayer k otherwise " + "{ m " * 80 + "}" * 81 + "\n", ("{", 64),
         ("nested more than 64 deep",)),
    # words the language knows
    Case("unknown-annotation", HEAD + "layer k otherwise {\n  mlp:mo3 {\n    gate:router\n  }\n}\n", ":mo3",
         ("unknown annotation `:mo3`", "expected: :0, :1, :!, :?, :moe, :moe-share, :router, :experts, :grouped",
          "did you mean `:moe`?")),
    Case("unknown-layout", in_experts("      tensor w [E,out] down :1\n"), "[E,out]",
         ("unknown tensor layout `[E,out]`", "[E,in,out]", "[E*in,out]", "did you mean `[E,out,in]`?")),
    Case("unknown-split", in_experts("      tensor w [E,out,in] concatt(gate, up) :1\n"), "concatt",
         ("unknown split `concatt`", "interleave(gate, up)", "did you mean `concat`?")),
    Case("unknown-role", in_experts("      tensor w [E,out,in] concat(gat, up) :1\n"), "gat, up",
         ("unknown projection role `gat`", "expected: gate, up, down", "did you mean `gate`?")),
    Case("unknown-fn", in_experts(FUSED + "      fn glue(silu)\n"), "glue",
         ("unknown expert function `glue`", "swiglu_clamped", "did you mean `glu`?")),
    Case("unknown-activation", in_experts(FUSED + "      fn glu(sillu)\n"), "sillu",
         ("unknown activation `sillu`", "relu2", "did you mean `silu`?")),
    Case("unknown-function", "arch a\nlet n = lenn(config.mlp_only_layers)\n", "lenn",
         ("unknown function `lenn`", "floordiv", "did you mean `len`?")),
    Case("unknown-call-argument", in_experts(FUSED + "      fn glu(silu)\n      call(hiden, index)\n"), "hiden",
         ("unknown call argument `hiden`", "did you mean `hidden`?")),
    Case("ckpt-without-expert-index", in_experts(FUSED + '      fn glu(silu)\n      ckpt gate "mlp.experts.gate_proj"\n'),
         '"mlp.experts.gate_proj"', ("needs `{e}`",)),
    # header and top-level structure
    Case("duplicate-header", "arch a\nlayers x\ntop_k 2\nlayers y\n", "layers y",
         ("`layers` is given twice (first at line 2)",)),
    Case("missing-arch", "// a comment\nlayers model.layers\nlayer k otherwise {}\n", "// a comment",
         ("must start with `arch NAME`", "expected: `arch`")),
    Case("otherwise-not-last", "arch a\nlayer dense otherwise {}\nlayer moe when i > 0 {}\n", "layer dense",
         ("layer kind `dense` is `otherwise`, so it must come last",)),
    # resolution: fragments, the tree's rules, names (`validate` resolves; `fmt` would only parse)
    Case("unknown-fragment", "arch a\nlayers x\nfragment attention { q_proj:0 }\nlayer k otherwise {\n  use attentoin\n}\n",
         "use attentoin", ("unknown fragment `attentoin`", "expected: attention", "did you mean `attention`?"),
         command="validate"),
    Case("fragment-cycle", "arch a\nlayers x\nfragment a { use b }\nfragment b { use a }\nlayer k otherwise {\n  use a\n}\n",
         "use a }", ("fragment `a` uses itself (a → b → a)",), command="validate"),
    Case("moe-inside-moe", HEAD + "layer k otherwise {\n  mlp:moe {\n    inner:moe {\n      gate:router\n"
         "      experts:experts {\n" + FUSED + "        fn glu(silu)\n      }\n    }\n  }\n}\n", "inner:moe",
         ("`inner:moe` is inside another `:moe` block (`mlp`)",), command="validate"),
    Case("tensor-outside-experts", "arch a\nlayers x\nlayer k otherwise {\n  mlp {\n    tensor w [E,out,in] down :1\n  }\n}\n",
         "tensor w", ("`tensor` belongs directly inside an `:experts` module",), command="validate"),
    Case("experts-without-fn", in_experts(FUSED), "experts:experts",
         ("`experts:experts` must declare its function once", "fn glu(silu)"), command="validate"),
    Case("stage-and-skip", "arch a\nlayers x\nlayer k otherwise {\n  q_proj:0:!\n}\n", "q_proj:0:!",
         ("`q_proj` has a stage and `:!`",), command="validate"),
    Case("unknown-name-in-expression", "arch a\nlayers x\nlet y = confg.num_experts\nlayer k when y > 1 {\n  q:0\n}\n",
         "confg", ("unknown name `confg` in let y", "expected: i, config, y", "did you mean `config`?"),
         command="validate"),
    Case("unknown-name-in-when", "arch a\nlayers x\nlayer k when j > 1 {\n  q:0\n}\n", "j > 1",
         ("unknown name `j` in layer k", "expected: i, config"), command="validate"),
]

assert len({c.id for c in CASES}) == len(CASES) and len({c.text for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_definition(case: Case, tmp_path, capsys) -> None:
    path = tmp_path / f"{case.id}.moedef"
    path.write_bytes(case.text.encode("utf-8"))
    line, col = position(case.text, case.where)
    rc, out, err = run_main(capsys, case.command, path)
    assert rc == 2, err
    check_located(err, path, case.text, line, col, case.words)


@pytest.mark.parametrize("case_id", ["unknown-annotation", "unknown-fragment", "nul-byte"])
def test_malformed_definition_in_subprocess(case_id: str, tmp_path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    path = tmp_path / f"{case.id}.moedef"
    path.write_bytes(case.text.encode("utf-8"))
    r = run_subprocess("validate", path)
    assert r.returncode == 2, r.stderr
    check_located(r.stderr, path, case.text, *position(case.text, case.where), case.words)


def test_parse_only_errors_pass_fmt() -> None:
    """The resolve cases are really resolve errors: they parse (so `fmt` alone would not catch them)."""
    from moedsl.lang.parser import parse

    for case in CASES:
        if case.command == "validate":
            parse(case.text, "t.moedef")


def test_extends_cycle(tmp_path, capsys) -> None:
    a = tmp_path / "cyc_a.moedef"
    b = tmp_path / "cyc_b.moedef"
    a_text = "arch cyc_a\nextends cyc_b\nlayers model.layers\nlayer k otherwise {\n  q:0\n}\n"
    b_text = "arch cyc_b\nextends cyc_a\n"
    a.write_text(a_text)
    b.write_text(b_text)
    rc, out, err = run_main(capsys, "validate", a)
    assert rc == 2, err
    # reported at the header of the definition that closes the circle
    check_located(err, b, b_text, *position(b_text, "arch cyc_b"),
                  ("`extends` goes round in a circle: cyc_a → cyc_b → cyc_a",))


def test_extends_unknown(tmp_path, capsys) -> None:
    path = tmp_path / "ext.moedef"
    text = "arch ext\nextends mixtrl\nlayers model.layers\n"
    path.write_text(text)
    rc, out, err = run_main(capsys, "validate", path)
    assert rc == 2, err
    check_located(err, path, text, 1, 1, ("no definition named `mixtrl`", "did you mean `mixtral`?"))


# ---- 2. validate against the real model classes ------------------------------------------------------------


def test_validate_misspelt_module_in_dense_mlp(tmp_path, capsys) -> None:
    text = QWEN3.read_text()
    dense = text.index("fragment dense_mlp")
    start = text.index("up_proj:2", dense)
    bad = text[:start] + "upe_proj:2" + text[start + len("up_proj:2"):]
    assert bad.count("upe_proj") == 1
    path = tmp_path / "qwen3_moe.moedef"
    path.write_text(bad)
    rc, out, err = run_main(capsys, "validate", path)
    assert rc == 2, err
    line, col = position(bad, "upe_proj")
    check_located(err, path, bad, line, col,
                  ("`mlp.upe_proj` does not exist", "layer 0", "kind `dense`", "did you mean `up_proj`?"))


def test_validate_correct_definition(capsys) -> None:
    rc, out, err = run_main(capsys, "validate", QWEN3)
    assert rc == 0, err
    assert "Traceback" not in err
    assert ": ok" in out
    for check in ("expressions", "structure", "expert function", "checkpoint names"):
        assert re.search(rf"✓ {check}:", out), out


# ---- 3. fmt -------------------------------------------------------------------------------------------------

NON_CANONICAL = """\
// a dense model, written on few lines
arch tiny_dense
layers model.layers
match "llama"
layer all otherwise { input_layernorm:!  self_attn { q_proj :0 k_proj:0 v_proj:0 o_proj:1 }
  post_attention_layernorm:! mlp { gate_proj:2 up_proj:2 down_proj:3 } // the MLP
}
"""


def test_fmt_check_and_write(tmp_path, capsys) -> None:
    path = tmp_path / "tiny_dense.moedef"
    path.write_text(NON_CANONICAL)
    rc, out, err = run_main(capsys, "fmt", "--check", path)
    assert rc == 1 and "would be reformatted" in err, err
    assert path.read_text() == NON_CANONICAL  # --check does not write

    rc, canonical, err = run_main(capsys, "fmt", path)
    assert rc == 0, err
    assert canonical != NON_CANONICAL
    assert "// a dense model, written on few lines" in canonical and "// the MLP" in canonical

    rc, out, err = run_main(capsys, "fmt", "--write", path)
    assert rc == 0 and "reformatted" in err, err
    assert path.read_text() == canonical
    rc, out, err = run_main(capsys, "fmt", "--check", path)
    assert (rc, err) == (0, "")


def test_fmt_check_canonical_library_file(capsys) -> None:
    rc, out, err = run_main(capsys, "fmt", "--check", QWEN3)
    assert (rc, err) == (0, "")


def test_fmt_keeps_comments(capsys) -> None:
    rc, out, err = run_main(capsys, "fmt", QWEN3)
    assert rc == 0, err
    assert out == QWEN3.read_text()
    comments = [s.strip() for s in QWEN3.read_text().splitlines() if s.strip().startswith("//")]
    assert len(comments) >= 3
    for c in comments:
        assert c in out


# ---- 4. list, 5. schema -------------------------------------------------------------------------------------


def test_list(capsys) -> None:
    rc, out, err = run_main(capsys, "list")
    assert rc == 0, err
    m = re.search(r"(\d+) definitions", out)
    assert m and int(m[1]) >= 30, out
    for arch in ("qwen3_moe", "gpt_oss", "dbrx"):
        assert re.search(rf"\b{arch}\b", out), arch


def test_list_json(capsys) -> None:
    rc, out, err = run_main(capsys, "list", "--json")
    assert rc == 0, err
    defs = json.loads(out)
    assert len(defs) >= 30
    archs = {d["arch"] for d in defs}
    assert {"qwen3_moe", "gpt_oss", "dbrx"} <= archs
    qwen = next(d for d in defs if d["arch"] == "qwen3_moe")
    assert qwen["moe"] is True and "qwen3_moe" in qwen["matches"]


@pytest.mark.parametrize("what,title", [("plan", "HookPlan"), ("ir", "Definition"), ("report", "Report")])
def test_schema(what: str, title: str, capsys) -> None:
    rc, out, err = run_main(capsys, "schema", what)
    assert rc == 0, err
    schema = json.loads(out)
    assert schema["title"] == title and schema["type"] == "object" and schema["properties"]
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validators.validator_for(schema).check_schema(schema)


# ---- 6. bad options, 7. unknown files --------------------------------------------------------------------------


def test_plan_unknown_policy(capsys) -> None:
    rc, out, err = run_main(capsys, "plan", QWEN3, "--policy", "bogus")
    assert rc == 2, err
    assert "Traceback" not in err
    assert "unknown MoE policy `bogus`" in err
    assert "expected: routed, all, topk=N, auto(min_tokens=N)" in err


def test_quantize_bad_bits_fails_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    # a cache of its own: the session's may already hold the default model another test built
    moedsl_cache = tmp_path / "cache"
    moedsl_cache.mkdir()
    monkeypatch.setenv("MOEDSL_CACHE", str(moedsl_cache))
    out_dir = tmp_path / "out"
    t0 = time.perf_counter()
    rc, out, err = run_main(capsys, "quantize", "--bits", "9", "--out", out_dir)
    seconds = time.perf_counter() - t0
    assert rc == 2, err
    assert "Traceback" not in err
    assert "bits must be between 2 and 8, got 9" in err
    assert not out_dir.exists()  # --out not created
    # the default model was not built (the parser keeps its analysed grammar there, nothing else)
    assert [p.name for p in moedsl_cache.iterdir() if p.name != "grammar"] == []
    assert seconds < 15, seconds


@pytest.mark.parametrize("command", ["fmt", "validate", "plan"])
def test_missing_file(command: str, capsys) -> None:
    rc, out, err = run_main(capsys, command, "/nonexistent.moedef")
    assert rc == 2, err
    assert "Traceback" not in err
    assert "/nonexistent.moedef: no such file" in err


def test_fmt_directory(tmp_path, capsys) -> None:
    rc, out, err = run_main(capsys, "fmt", tmp_path)
    assert rc == 2, err
    assert "Traceback" not in err and str(tmp_path) in err


def test_missing_file_in_subprocess() -> None:
    r = run_subprocess("fmt", "/nonexistent.moedef")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: /nonexistent.moedef: no such file"
