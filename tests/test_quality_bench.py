"""bench/quality.py --small --device cpu: trains a tiny MoE on the stdlib, quantizes it, and reports
held-out perplexities (about a minute on 2 CPU cores)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

BENCH = REPO / "bench" / "quality.py"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(BENCH), "--small", "--device", "cpu", "--work", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_results_have_every_row(small_run):
    work, stdout = small_run
    results = json.loads((work / "results.json").read_text())
    names = [r["name"] for r in results["runs"][0]["rows"]]
    expected = ["baseline (bf16)", "rtn w4 g32"] + [f"{s} w4 {p} c{n}" for s in ("gptq", "gptaq")
                                                    for p in ("routed", "all") for n in (4, 8)]
    assert names == expected + ["gptq w4 routed c8 draw1"]  # the calibration-draw noise row
    ppl = {r["name"]: r["ppl"] for r in results["runs"][0]["rows"]}
    assert results["draw_spread"]["4"] == pytest.approx(abs(ppl["gptq w4 routed c8 draw1"] - ppl["gptq w4 routed c8"]))
    assert results["noise"]["4"] == results["draw_spread"]["4"]  # the checks use the measured noise
    for row in results["runs"][0]["rows"]:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1.0, row
    base = results["runs"][0]["rows"][0]["ppl"]
    assert base < 259  # trained: better than a uniform guess over the byte vocabulary
    for row in results["runs"][0]["rows"]:
        if row["method"] == "gptq":
            assert row["stage_errors"] and all(math.isfinite(s["error"]) for s in row["stage_errors"])
            if row["policy"] == "routed":
                assert [c["layer"] for c in row["coverage"]] == [0, 1]
                assert all(len(c["tokens"]) == 8 for c in row["coverage"])
    kinds = {c["check"].split()[0] for c in results["checks"]}
    assert {"gptq_closes_half_gap", "all_le_routed", "solver_not_worse"} <= kinds
    assert kinds <= {"gptq_closes_half_gap", "all_le_routed", "solver_not_worse", "best_closes_80"}
    assert "checks:" in stdout and "expert coverage under routed calibration" in stdout


def test_plots_written(small_run):
    work, _ = small_run
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    for name in ("coverage.png", "gptq_error.png"):
        assert (work / name).stat().st_size > 1000


def test_bench_unpacker_matches_reference(small_run):
    """The bench's own GPTQ unpacker agrees with the tests' independent reader."""
    from unpack_reference import dequantize_gptq, read_checkpoint

    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    work, _ = small_run
    ckpt = work / "run0" / "gptq-w4-routed-c4"
    cfg = json.loads((ckpt / "quantize_config.json").read_text())
    tensors = read_checkpoint(ckpt)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    assert len(names) == 2 * (4 + 3 * 8)  # 2 layers: q/k/v/o and gate/up/down of 8 experts
    for name in names:
        ours = quality.dequantize_gptq(tensors, name, cfg["bits"], cfg["checkpoint_format"] == "gptq").numpy()
        np.testing.assert_array_equal(ours, dequantize_gptq(tensors, name, cfg)["weight"])
