"""The run as a pipeline (reader → quantizer → packer → writer): overlapped and step-by-step runs
write the same bytes, a run killed while a background write is in flight resumes to the same
bytes, and the report records where the time went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moedsl

RUN = dict(group_size=-1, samples=4, seq_len=32, progress=False, resume_interval=0)  # a resume state per layer
ARGS = ["--group-size", "-1", "--samples", "4", "--seq-len", "32", "--no-progress", "--resume-interval", "0"]
REPORT = "moedsl-report.json"
TIMING = {"seconds", "host_peak_bytes", "peak_gpu_bytes", "phases", "phases_s", "phase_peak_gpu_gib"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING and k not in ("out", "pipeline", "resume_interval")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_checkpoint(a: Path, b: Path) -> None:
    names = {p.name for p in a.iterdir()}
    assert names == {p.name for p in b.iterdir()}
    assert not any(n.startswith(".") for n in names), names  # no temporary or resume files left
    for name in sorted(names - {REPORT}):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _strip(json.loads((a / REPORT).read_text())) == _strip(json.loads((b / REPORT).read_text()))


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("qwen3_moe", num_hidden_layers=3)


@pytest.fixture(scope="module")
def overlapped(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overlap") / "out"
    moedsl.quantize(model=model, out=out, pipeline="overlap", **RUN)
    return out


def test_serial_and_overlap_write_the_same_bytes(model, overlapped, tmp_path):
    out = tmp_path / "serial"
    moedsl.quantize(model=model, out=out, pipeline="serial", **RUN)
    assert_same_checkpoint(out, overlapped)


def test_report_records_phases(overlapped):
    phases = json.loads((overlapped / REPORT).read_text())["phases"]
    for key in ("startup", "read", "statistics", "solve", "pack", "replay", "write", "resume_state", "gpu_idle",
                "wall", "startup.skeleton", "startup.plan", "startup.capture"):
        assert key in phases and phases[key] >= 0, key
    assert phases["statistics"] > 0 and phases["solve"] > 0 and phases["write"] > 0
    main_thread = sum(v for k, v in phases.items() if not k.startswith("startup.") and k not in (
        "read_ahead", "write", "resume_state", "gpu_idle", "wall", "startup"))
    assert main_thread <= phases["wall"]


def test_report_records_each_layers_phases(overlapped):
    """Each layer's own seconds per phase: its main-thread phases fit in its time, and over the layers
    they add up to the run's."""
    report = json.loads((overlapped / REPORT).read_text())
    layers = report["layers"]
    assert len(layers) == 3
    for layer in layers:
        own = layer["phases_s"]
        assert own["read"] > 0 and own["statistics"] > 0 and own["solve"] > 0 and own["replay"] > 0, own
        main_thread = sum(own.get(k, 0.0) for k in ("read", "statistics", "solve", "pack", "replay", "share_weights"))
        assert main_thread <= layer["seconds"] + 1e-3, (main_thread, layer["seconds"])
    for key in ("statistics", "solve", "replay"):
        assert sum(layer["phases_s"][key] for layer in layers) == pytest.approx(report["phases"][key], abs=2e-3)


@pytest.mark.parametrize("where", ["1:shard", "1:acts", "0:acts"])
def test_kill_during_background_write_resumes_byte_identical(model, overlapped, tmp_path, cli, where):
    """SIGKILL inside the writer thread — after layer 1's shard is renamed but before its resume state,
    or as the resume state is about to be committed — while the quantizer works on the next layer."""
    out = tmp_path / "killed"
    r = cli("quantize", "--model", str(model), "--out", str(out), *ARGS, env={"MOEDSL_KILL_IN_WRITE": where})
    assert r.returncode == -9, r.stderr[-2000:]
    layer = int(where.split(":")[0])
    state = out / ".moedsl-run" / "state.json"
    finished = json.loads(state.read_text())["finished"] if state.exists() else 0  # none: nothing was committed
    assert finished == layer  # the killed layer's state was not committed
    assert (out / f"layer-{layer:05d}.safetensors").is_file()  # written, to be redone
    assert not (out / "config.json").exists()
    r = cli("quantize", "--model", str(model), "--out", str(out), *ARGS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_checkpoint(out, overlapped)


def test_resume_interval_records_no_state_between_and_a_kill_starts_over(model, overlapped, tmp_path, cli):
    """--resume-interval longer than the run: every layer's shard is written, no resume state ever is
    (no activations on disk); a run killed at layer 2 therefore starts over, and writes the same bytes."""
    out = tmp_path / "sparse"
    args = ["quantize", "--model", str(model), "--out", str(out), *ARGS, "--resume-interval", "3600"]
    r = cli(*args, env={"MOEDSL_TEST_STOP": "layer:2:start"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "layer-00000.safetensors").is_file() and (out / "layer-00001.safetensors").is_file()
    assert not (out / ".moedsl-run" / "state.json").exists()
    assert not list((out / ".moedsl-run").glob("*acts-*"))
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" not in r.stderr
    assert_same_checkpoint(out, overlapped)


@pytest.mark.parametrize("bad", ["-1", "nan"])
def test_resume_interval_must_be_seconds(model, tmp_path, cli, bad):
    r = cli("quantize", "--model", str(model), "--out", str(tmp_path / "o"), *ARGS, "--resume-interval", bad)
    assert r.returncode == 2 and "--resume-interval" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
