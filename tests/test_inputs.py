"""Bad input of every class in issue #13 gets exit 2 and a located message, never a traceback or a
checkpoint made of random weights: configs that do not fit their checkpoint, damaged model
directories, impossible options, hostile calibration files, `fmt` on bad files, checkpoint-name
templates, and NaN/Inf weights. (tests/adversarial runs many more such cases through the CLI.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moedsl.cli import main as cli_main
from moedsl.errors import MoedslError

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--group-size", "32", "--samples", "2", "--seq-len", "16", "--no-progress"]
QWEN_DEF = (REPO / "model_defs" / "qwen3_moe.moedef").read_text()
GATE = '"mlp.experts.{e}.gate_proj"'


@pytest.fixture
def qwen(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny qwen3_moe checkpoint (2 layers, 8 experts), free to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe"), dst)
    return dst


def _edit(model: Path, **changes) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    return model


def _quantize(capsys, model: Path | None, out: Path, *extra: str) -> tuple[int, str]:
    args = ["quantize", *(["--model", str(model)] if model else []), "--out", str(out), *SMALL, *extra]
    rc = cli_main(args)
    return rc, capsys.readouterr().err


def _refused(capsys, model, out, *extra) -> str:
    rc, err = _quantize(capsys, model, out, *extra)
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (out / "config.json").exists() and not (out / "moedsl-report.json").exists()
    return err


# ---- a config that does not fit its checkpoint ------------------------------------------------


def test_mixtral_config_on_qwen3_weights_is_refused(qwen, tmp_path, capsys):
    _edit(qwen, model_type="mixtral", architectures=["MixtralForCausalLM"])
    err = _refused(capsys, qwen, tmp_path / "out")
    assert "match no parameter of MixtralForCausalLM" in err and "model.layers.0.mlp.down_proj.weight" in err
    assert "--allow-unused-weights" in err


def test_more_layers_than_the_checkpoint_is_refused_before_building(qwen, tmp_path, capsys):
    _edit(qwen, num_hidden_layers=10**6)
    t0 = time.perf_counter()
    err = _refused(capsys, qwen, tmp_path / "out")
    assert time.perf_counter() - t0 < 30  # no skeleton of a million layers is built
    assert "config.json:" in err and "`num_hidden_layers` is 1000000" in err and "model.layers.2" in err


def test_fewer_layers_than_the_checkpoint(qwen, tmp_path, capsys):
    _edit(qwen, num_hidden_layers=1)
    err = _refused(capsys, qwen, tmp_path / "out")
    assert "num_hidden_layers = 1" in err and "model.layers.1.input_layernorm.weight" in err
    # the explicit option relaxes it, and the report says what was ignored
    rc, err = _quantize(capsys, qwen, tmp_path / "out2", "--allow-unused-weights")
    assert rc == 0, err
    report = json.loads((tmp_path / "out2" / "moedsl-report.json").read_text())
    assert any("--allow-unused-weights" in w and "model.layers.1" in w for w in report["warnings"])
    assert len(report["layers"]) == 1


def test_missing_and_misshapen_tensors(qwen, tmp_path, capsys):
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(str(qwen / "model.safetensors"))
    q = tensors.pop(key)
    save_file(tensors, str(qwen / "model.safetensors"), metadata={"format": "pt"})
    err = _refused(capsys, qwen, tmp_path / "out")
    assert "not in the checkpoint" in err and key in err and "--allow-missing-weights" in err
    rc, err = _quantize(capsys, qwen, tmp_path / "out2", "--allow-missing-weights")
    assert rc == 0, err
    warnings = json.loads((tmp_path / "out2" / "moedsl-report.json").read_text())["warnings"]
    assert any(key in w and "--allow-missing-weights" in w for w in warnings)

    tensors[key] = torch.zeros(q.shape[0], q.shape[1] // 2)
    save_file(tensors, str(qwen / "model.safetensors"), metadata={"format": "pt"})
    err = _refused(capsys, qwen, tmp_path / "out3", "--allow-missing-weights")
    assert f"`{key}`: checkpoint shape [64, 32], the model expects [64, 64]" in err


def test_fewer_experts_than_the_checkpoint(qwen, tmp_path, capsys):
    _edit(qwen, num_experts=4, num_local_experts=4)
    err = _refused(capsys, qwen, tmp_path / "out")
    assert "`model.layers.1.mlp.experts.gate_up_proj` is made of 16 checkpoint tensors" in err


# ---- damaged model directories and impossible config values -------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_shard(qwen, tmp_path, capsys, damage):
    shard = qwen / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    err = _refused(capsys, qwen, tmp_path / "out")
    assert f"{shard}: not a readable safetensors file" in err


def test_index_key_missing_from_its_shard(qwen, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map["model.layers.1.mlp.experts.9.up_proj.weight"] = "model.safetensors"
    (qwen / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    err = _refused(capsys, qwen, tmp_path / "out")
    assert "model.safetensors.index.json" in err and "model.layers.1.mlp.experts.9.up_proj.weight" in err


@pytest.mark.parametrize("change, words", [
    (dict(num_experts_per_tok=99), ["`num_experts_per_tok` is 99, more than the 8 experts"]),
    (dict(pad_token_id=1000), ["`pad_token_id` is 1000, outside the vocabulary", "vocab_size 320"]),
    (dict(hidden_size=-64), ["`hidden_size` is -64; it must be a positive integer"]),
])
def test_impossible_config_values(qwen, tmp_path, capsys, change, words):
    _edit(qwen, **change)
    err = _refused(capsys, qwen, tmp_path / "out")
    key = next(iter(change))
    text = (qwen / "config.json").read_text().splitlines()
    line = next(i for i, l in enumerate(text, 1) if f'"{key}"' in l)
    assert f"config.json:{line}:" in err  # located at the key
    for w in words:
        assert w in err


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--batch-size", "0"], ["--batch-size 0: must be a positive integer"]),
    (["--batch-size", "-3"], ["--batch-size -3"]),
    (["--seq-len", "-32"], ["--seq-len -32: must be a positive integer"]),
    (["--seed", "12345678901234567890123"], ["--seed 12345678901234567890123: out of range"]),
    (["--policy", "auto(min_tokens=" + "9" * 30 + ")"], ["--policy auto(min_tokens=", "min_tokens"]),
    (["--device", "meta"], ["--device meta: not a device moedsl runs on"]),
    (["--samples", "1000000000", "--seq-len", "1000000000"], ["--samples 1000000000 × --seq-len 1000000000"]),
    (["--bits", "9"], ["--bits 9: bits must be between 2 and 8"]),
])
def test_bad_options_name_the_option_and_value(tmp_path, capsys, extra, words):
    err = _refused(capsys, None, tmp_path / "out", *extra)
    for w in words:
        assert w in err, err


def test_tokens_that_cannot_fit_in_memory_are_refused_before_allocating(qwen, tmp_path, capsys):
    from moedsl.execute.option_check import host_memory_available

    have = host_memory_available()
    samples = have // (2 * 64 * 4 * 1000) + 1  # hidden 64, float32, seq-len 1000: more than the host holds
    err = _refused(capsys, qwen, tmp_path / "out", "--samples", str(samples), "--seq-len", "1000")
    assert f"--samples {samples} × --seq-len 1000" in err and "GiB of host memory is available" in err


# ---- calibration files -------------------------------------------------------------------------


def _calib_error(tmp_path, name: str, content: bytes | str) -> str:
    from moedsl.calib.data import load_calibration

    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    with pytest.raises(MoedslError) as info:
        load_calibration(path, model, 2, 8, 0)
    return info.value.render()


def test_calibration_nested_too_deeply(tmp_path):
    msg = _calib_error(tmp_path, "deep.jsonl", "[1, 2]\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "deep.jsonl:2:1" in msg and "nested too deeply" in msg


def test_calibration_integer_with_5000_digits(tmp_path):
    msg = _calib_error(tmp_path, "big.jsonl", "[1, " + "9" * 5000 + "]\n")
    assert "big.jsonl:1:1" in msg and "5000 digits" in msg and "no token id" in msg


def test_calibration_text_named_npy(tmp_path):
    msg = _calib_error(tmp_path, "words.npy", "hello, these are words\n")
    assert "words.npy: not a .npy array file" in msg and "pickle" not in msg


def test_calibration_npy_of_objects(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    msg = _calib_error(tmp_path, "obj.npy", path.read_bytes())
    assert "holds Python objects" in msg and "allow_pickle" not in msg


def test_calibration_text_not_utf8_is_located(tmp_path):
    msg = _calib_error(tmp_path, "l1.txt", "ok line\ncaf\u00e9\n".encode("latin-1"))
    assert "l1.txt:2:4" in msg and "0xe9" in msg


# ---- fmt ---------------------------------------------------------------------------------------


def _fmt(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    from tests.adversarial.case import without_file_override

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moedsl", "fmt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, preexec_fn=without_file_override if unprivileged else None)


def test_fmt_not_utf8_is_located_as_line_and_column(tmp_path):
    f = tmp_path / "l1.moedef"
    lines = QWEN_DEF.splitlines(keepends=True)
    f.write_bytes("".join(lines[:3]).encode() + "// café\n".encode("latin-1") + "".join(lines[3:]).encode())
    r = _fmt(str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{f}:4:7: error: not UTF-8 text: byte 0xe9" in r.stderr


def test_fmt_lone_surrogate_escape(tmp_path):
    f = tmp_path / "s.moedef"
    f.write_text(QWEN_DEF.replace(GATE, '"mlp.experts.{e}.gate\\ud800"'))
    line = next(i for i, l in enumerate(QWEN_DEF.splitlines(), 1) if GATE in l)
    for args in ([str(f)], ["--write", str(f)]):
        r = _fmt(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{f}:{line}:" in r.stderr and "lone surrogate U+D800" in r.stderr


def test_fmt_write_on_an_unwritable_file(tmp_path):
    f = tmp_path / "ro.moedef"
    original = QWEN_DEF.replace("    q_proj:0", "q_proj:0")
    f.write_text(original)
    f.chmod(0o444)
    r = _fmt("--write", str(f), unprivileged=True)  # as root too, the file's mode holds
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{f}: cannot write: Permission denied" in r.stderr
    assert f.read_text() == original


# ---- checkpoint-name templates -----------------------------------------------------------------


@pytest.mark.parametrize("template, at, words", [  # `at`: the text the caret points at (the first bad brace)
    ('"mlp.experts.{x}.{e}"', "{x}", ["`{x}` is not a placeholder"]),
    ('"mlp.experts.{e}.gate{"', '{"', ["`{` opens no placeholder"]),
    ('"mlp.experts.{e:>200000000}"', "{e:", ["`{e:>200000000}` is not a placeholder"]),
    ('"mlp.experts.{e.__class__.__init__.__globals__}.{e}"', "{e.", ["`{e.__class__.__init__.__globals__}`"]),
    ('"mlp.experts.{e}}"', '}"', ["`}` closes no placeholder"]),
])
def test_checkpoint_name_templates_substitute_only_e(template, at, words):
    from moedsl.lang.parser import parse

    text = QWEN_DEF.replace(GATE, template)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if template in l)
    col = text.splitlines()[line - 1].index(at) + 1
    with pytest.raises(MoedslError) as info:
        parse(text, "bad.moedef")
    msg = info.value.render()
    assert f"bad.moedef:{line}:{col}:" in msg, msg
    for w in words:
        assert w in msg


def test_templates_are_expanded_by_substitution():
    from moedsl.lang.ckpt_name import expand

    assert expand("mlp.experts.{e}.w1", 7) == "mlp.experts.7.w1"
    assert expand("{e}.{e}", 3) == "3.3"


# ---- NaN / Inf weights -------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, words", [
    ("model.layers.1.mlp.experts.3.gate_proj.weight", float("nan"),
     ["layer 1 (moe)", "expert 3 of `mlp.experts`, target gate", "model.layers.1.mlp.experts.3.gate_proj.weight"]),
    ("model.layers.0.self_attn.q_proj.weight", float("inf"),
     ["layer 0 (dense)", "target self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"]),
])
def test_non_finite_weights_are_named(qwen, tmp_path, capsys, key, value, words):
    tensors = load_file(str(qwen / "model.safetensors"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[5] = value
    save_file(tensors, str(qwen / "model.safetensors"), metadata={"format": "pt"})
    rc, err = _quantize(capsys, qwen, tmp_path / "out")
    assert rc == 2 and "Traceback" not in err
    for w in words:
        assert w in err, err
