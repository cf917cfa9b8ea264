"""The output directory: never a source, locked, resumable after a kill at any moment, complete or
visibly not, and filesystem errors reported with exit 2.

Refusals run the CLI in-process (they must fail before any model is loaded); locking, kills and
filesystem errors run real `python -m moedsl` processes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from moedsl.cli import main as cli_main

FAST = ["--group-size", "32", "--samples", "2", "--seq-len", "16", "--no-progress"]
REPORT = "moedsl-report.json"


def _tree(root: Path) -> dict[str, str]:
    """Every file below `root` (relative path → sha256), symlinks by their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _refused(capsys, *args: str) -> str:
    rc = cli_main(["quantize", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def _looks_finished(d: Path) -> Path:
    """Make `d` look like a finished moedsl output (what --overwrite replaces)."""
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "config.json").exists():
        (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (d / REPORT).write_text("{}")
    return d


@pytest.fixture
def model_copy(default_model, tmp_path) -> Path:
    return Path(shutil.copytree(default_model, tmp_path / "model"))


# ---- 1. a source is never deleted or written ----------------------------------------------------


def test_out_is_the_model(model_copy, capsys):
    _looks_finished(model_copy)
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(model_copy), "--overwrite", *FAST)
    assert f"--out {model_copy} is --model {model_copy}" in err
    assert _tree(model_copy) == before


def test_model_inside_out(model_copy, tmp_path, capsys):
    out = _looks_finished(tmp_path / "out")
    model = Path(shutil.move(model_copy, out / "src"))
    before = _tree(out)
    err = _refused(capsys, "--model", str(model), "--out", str(out), "--overwrite", *FAST)
    assert f"--out {out} holds --model {model}" in err
    assert _tree(out) == before


def test_no_resume_over_a_killed_run_holding_the_model(model_copy, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".moedsl-run").mkdir(parents=True)
    (out / ".moedsl-run" / "state.json").write_text(json.dumps({"finished": 1}))
    model = Path(shutil.move(model_copy, out / "src"))
    before = _tree(out)
    err = _refused(capsys, "--model", str(model), "--out", str(out), "--no-resume", *FAST)
    assert "holds --model" in err
    assert _tree(out) == before


def test_out_is_a_symlink_to_the_model(model_copy, tmp_path, capsys):
    _looks_finished(model_copy)
    link = tmp_path / "link"
    link.symlink_to(model_copy, target_is_directory=True)
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(link), "--overwrite", *FAST)
    assert f"--out {link} is --model {model_copy}" in err
    assert _tree(model_copy) == before


def test_out_inside_the_model(model_copy, capsys):
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(model_copy / "q"), *FAST)
    assert "lies inside --model" in err
    assert _tree(model_copy) == before and not (model_copy / "q").exists()


def test_out_holds_the_files_the_model_links_to(model_copy, tmp_path, capsys):
    """A hub-cache layout: the snapshot's files are symlinks into a blobs directory."""
    blobs = _looks_finished(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in model_copy.iterdir():
        if f.name != "config.json":
            target = Path(shutil.move(f, blobs / ("blob-" + f.name)))
            (snapshot / f.name).symlink_to(target)
    shutil.move(model_copy / "config.json", snapshot / "config.json")
    before = _tree(blobs)
    err = _refused(capsys, "--model", str(snapshot), "--out", str(blobs), "--overwrite", *FAST)
    assert "through a symlink" in err
    assert _tree(blobs) == before


def test_out_holds_the_calibration_file(tmp_path, capsys, default_model):
    out = _looks_finished(tmp_path / "out")
    calib = out / "calib.jsonl"
    calib.write_text(json.dumps({"input_ids": list(range(64))}) + "\n")
    before = _tree(out)
    err = _refused(capsys, "--calib", str(calib), "--out", str(out), "--overwrite", *FAST)
    assert f"holds the --calib file {calib}" in err
    assert _tree(out) == before


def test_out_holds_the_builtin_default_model(default_model, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(default_model, cache / default_model.name)
    _looks_finished(cache)
    monkeypatch.setenv("MOEDSL_CACHE", str(cache))
    before = _tree(cache)
    err = _refused(capsys, "--out", str(cache), "--overwrite", *FAST)
    assert "holds the built-in default model" in err
    assert _tree(cache) == before
