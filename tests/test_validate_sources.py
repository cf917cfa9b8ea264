"""`moedsl validate` against a model directory (its config and its checkpoint's real keys) and
against a config.json, through the library and the CLI."""

from __future__ import annotations

import json

import pytest

import moedsl
from moedsl.cli import main
from moedsl.models.tiny import save_tiny, tiny_config


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral") / "model")


def test_validate_against_a_model_directory(mixtral_dir):
    (report,) = moedsl.validate("model_defs/mixtral.moedef", model_dir=mixtral_dir)
    assert report.ok, "\n".join(report.problems)
    names = {c.name: c for c in report.checks}
    assert names["checkpoint names"].passed and "found" in names["checkpoint names"].detail
    assert str(mixtral_dir) in report.model_source


def test_wrong_checkpoint_names_fail_against_the_directory(mixtral_dir, tmp_path):
    text = open("model_defs/mixtral.moedef").read()
    assert "block_sparse_moe.experts.{e}.w1" in text
    bad = tmp_path / "mixtral_bad.moedef"
    bad.write_text(text.replace("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w9"))
    (report,) = moedsl.validate(bad, model_dir=mixtral_dir)
    assert not report.ok
    problem = next(p for p in report.problems if "w9" in p)
    assert "not among the keys" in problem and "did you mean" in problem
    assert 'ckpt gate "block_sparse_moe.experts.{e}.w9"' in problem  # the caret is on the `ckpt` line


def test_validate_against_a_config_file(tmp_path, capsys):
    cfg = tiny_config("qwen3_moe")
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    (report,) = moedsl.validate("model_defs/qwen3_moe.moedef", config=path)
    assert report.ok, "\n".join(report.problems)
    assert main(["validate", "model_defs/qwen3_moe.moedef", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ok"] is True


def test_cli_validate_model_dir_and_bad_config(mixtral_dir, tmp_path, capsys):
    assert main(["validate", "model_defs/mixtral.moedef", "--model", str(mixtral_dir)]) == 0
    broken = tmp_path / "config.json"
    broken.write_text('{"model_type": "qwen3_moe",\n  "hidden_size": }')
    assert main(["validate", "model_defs/qwen3_moe.moedef", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:2:" in err and "Traceback" not in err
    assert main(["validate", "model_defs/qwen3_moe.moedef", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
