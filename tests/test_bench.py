"""The MoE-layer benchmark's small CPU run: the fast path and the unbatched path give identical weights."""

import json
import subprocess

import pytest
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("solver", [[], ["--solver", "gptaq", "--act-order"]], ids=["gptq", "gptaq-act"])
def test_moe_layer_bench_small_cpu(solver):
    proc = subprocess.run([sys.executable, "bench/moe_layer.py", "--small", "--device", "cpu", *solver], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out)
    for key in ("device", "seconds_per_layer", "unbatched_seconds", "speedup", "peak_gpu_gib", "max_abs_weight_diff"):
        assert key in out
    assert out["device"] == "cpu" and out["solver"] == (solver[1] if solver else "gptq")
    assert out["max_abs_weight_diff"] == 0.0  # the batched solves equal one-matrix-at-a-time solves exactly
    assert out["weights_differing"] == 0
    assert out["seconds_per_layer"] > 0 and out["unbatched_seconds"] > 0


def test_e2e_bench_small_cpu(tmp_path):
    """bench/e2e.py --small: builds a loadable checkpoint, quantizes it through the CLI, prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    proc = subprocess.run([sys.executable, "bench/e2e.py", "--small", "--device", "cpu", "--seqs", "4", "--seq-len",
                           "32", "--work", str(tmp_path), "--no-llmcompressor"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == "small" and out["layers"] == 2 and out["tokens"] == 128
    run = out["moedsl"]
    assert run["wall_s"] > 0 and len(run["layer_s"]) == 2
    # (no `resume_state`: a run this short records none, --resume-interval)
    for phase in ("startup", "read", "statistics", "solve", "pack", "write", "gpu_idle"):
        assert phase in run["phases_s"], phase
    steady = run["steady_layer"]  # the second layer, with the phases it added
    assert steady["layers"] == 1 and steady["seconds"] == pytest.approx(run["layer_s"][1], abs=1e-3)
    assert steady["phases_s"]["solve"] > 0 and steady["phases_s"]["statistics"] > 0
    assert run["first_layer_phases_s"]["read"] > 0 and run["first_layer_phases_s"]["solve"] > 0
    # the built directory is a real transformers checkpoint: from_pretrained loads every weight from it
    model_dir = tmp_path / "small-2L-0D"
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.shape == (16, 256, 256) and float(experts.detach().float().std()) > 0.01
    assert torch.equal(model.model.norm.weight, torch.ones(256, dtype=torch.bfloat16))
def test_e2e_bench_fp8_source_small_cpu(tmp_path):
    """bench/e2e.py --source fp8: the decoder layers' linear weights stored as e4m3 with a scale per
    128 × 128 block (DeepSeek-V3's layout, in about half the bytes), which the run reads and quantizes."""
    from safetensors import safe_open

    proc = subprocess.run([sys.executable, "bench/e2e.py", "--small", "--device", "cpu", "--seqs", "4", "--seq-len",
                           "32", "--work", str(tmp_path), "--source", "fp8"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["source"] == "fp8" and len(out["moedsl"]["layer_s"]) == 2
    assert "not_run" in out["llmcompressor"]  # asked for, and said why it is not run on this source
    model_dir = tmp_path / "small-2L-0D-fp8"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(weight_map.values()):
        with safe_open(str(model_dir / shard), "pt") as f:
            stored |= {k: f.get_slice(k).get_dtype() for k in f.keys()}
    experts = [k for k in stored if ".experts." in k and k.endswith(".weight")]
    assert len(experts) == 2 * 16 * 3
    for k in experts + [k for k in stored if k.endswith("self_attn.q_proj.weight")]:
        assert stored[k] == "F8_E4M3" and stored[k.removesuffix("weight") + "weight_scale_inv"] == "F32", k
    assert stored["model.embed_tokens.weight"] == "BF16" and stored["model.layers.0.mlp.gate.weight"] == "BF16"


def test_fp8_layer_bench_small_cpu():
    """The DeepSeek-V3-shaped FP8 bench, shrunk: writes the FP8 layer, streams and dequantizes it."""
    proc = subprocess.run([sys.executable, "bench/fp8_layer.py", "--small", "--device", "cpu", "--no-quantize"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == "small" and out["block"] == [128, 128]
    assert out["fp8_tensors"] == 3 * 16 + 3 + 5  # routed experts, the shared expert, the attention projections
    for key in ("write_seconds", "load_seconds", "read_seconds", "dequant_seconds"):
        assert out[key] > 0


def test_gil_bench_small_cpu():
    """bench/gil.py: the writer stage writes a real layer (packed by the real packer) beside the main loop."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gil_bench", ROOT / "bench" / "gil.py")
    gil = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gil)
    out = gil.main(["--experts", "4", "--hidden", "256", "--inter", "128", "--tokens", "1024", "--alone-s", "0.2"])
    assert out["op_us_alone"] > 0
    writer = out["writer"]
    assert writer["modules"] == 4 + 3 * 4  # q, k, v, o and 4 experts × gate, up, down
    assert writer["packed_mib"] > 0 and writer["stage_s"] > 0 and writer["slowdown"] > 0
    assert "reader" not in out  # no --model


def test_peak_bench_replays_an_allocator_trace_to_its_peak():
    """bench/peak.py's replay: the blocks live when the most bytes were allocated, not those of the end."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peak
    finally:
        sys.path.pop(0)
    here = [{"filename": "/x/moedsl/execute/statistics.py", "line": 7, "name": "collect"}]
    there = [{"filename": "/y/transformers/integrations/moe.py", "line": 9, "name": "forward"}]
    events = [{"action": "alloc", "addr": 1, "size": 100, "frames": here},
              {"action": "alloc", "addr": 2, "size": 300, "frames": there},
              {"action": "free_requested", "addr": 2, "size": 300},
              {"action": "free_completed", "addr": 2, "size": 300},
              {"action": "alloc", "addr": 3, "size": 350, "frames": here},  # 450: the peak
              {"action": "free_completed", "addr": 1, "size": 100},
              {"action": "alloc", "addr": 4, "size": 50, "frames": there}]
    top, blocks = peak.live_at_peak(events)
    assert top == 450 and sorted(b["addr"] for b in blocks) == [1, 3]
    groups = peak.by_frame(blocks, peak.innermost_moedsl)
    assert groups == [{"where": "moedsl/execute/statistics.py:7 collect", "gib": round(450 / 2 ** 30, 3), "blocks": 2}]


def test_peak_bench_says_it_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "bench/peak.py", "--model", "x", "--out", "y"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
