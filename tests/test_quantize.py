"""End-to-end quantization runs: the real CLI, MoE policies, the writers' output read back by an
independent unpacker, resuming a killed run, bad input, and every library architecture.

Runs are small (samples 8 × seq_len 64 on the default model, 4 × 32 on tiny models) so the whole
file stays within a few minutes on two CPU cores. `pytest -s` shows the GPTQ/RTN numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
import torch
from safetensors.torch import load_file

import moedsl
from moedsl.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_ct, dequantize_gptq, read_checkpoint  # noqa: E402

RUN_ARGS = ["--group-size", "32", "--samples", "8", "--seq-len", "64", "--no-progress"]
RUN_KW = dict(group_size=32, samples=8, seq_len=64, progress=False)
REPORT = "moedsl-report.json"


def _report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


def _moe_gate_up(report: dict, layer: int) -> dict:
    """The gate (or gate_up) target of the routed experts in `layer`."""
    for stage in report["layers"][layer]["stages"]:
        for t in stage["targets"]:
            if t["matrices"] > 1 and ("gate" in t["id"] or "w1" in t["id"]):
                return t
    raise AssertionError(f"no expert gate/up target in layer {layer}")


def _moe_layers(report: dict) -> list[int]:
    return [l["layer"] for l in report["layers"] if any(t["matrices"] > 1 for s in l["stages"] for t in s["targets"])]


# ---- shared runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_out(tmp_path_factory, default_model, cli) -> Path:
    """The default model through the real CLI (GPTQ format); reused by several tests."""
    out = tmp_path_factory.mktemp("cli") / "gptq"
    r = cli("quantize", "--out", str(out), *RUN_ARGS)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def ct_out(tmp_path_factory, default_model) -> Path:
    out = tmp_path_factory.mktemp("lib") / "ct"
    moedsl.quantize(out=out, format="compressed-tensors", **RUN_KW)
    return out


@pytest.fixture(scope="module")
def default_weights(default_model) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(default_model).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


# ---- 1. the CLI end to end -------------------------------------------------------------------


def test_cli_default_model_end_to_end(gptq_out):
    config = json.loads((gptq_out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["group_size"] == 32
    index = json.loads((gptq_out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (gptq_out / shard).is_file()
    assert json.loads((gptq_out / "quantize_config.json").read_text())["bits"] == 4
    assert not (gptq_out / ".moedsl-run").exists()
    report = _report(gptq_out)
    assert report["layers"] and [l["layer"] for l in report["layers"]] == list(range(len(report["layers"])))
    print()
    for layer in report["layers"]:
        assert layer["stages"]
        for s in layer["stages"]:
            ids = ", ".join(t["id"] for t in s["targets"])
            print(f"layer {layer['layer']} ({layer['kind']}) stage {s['stage']}: GPTQ {s['error']:.4e}  "
                  f"RTN {s['rtn_error']:.4e}  ratio {s['error'] / s['rtn_error']:.3f}  [{ids}]")
            assert 0 <= s["error"] < s["rtn_error"], (layer["layer"], s["stage"])
            for t in s["targets"]:
                assert t["error"] < t["rtn_error"], (layer["layer"], t["id"])


# ---- 2. MoE policies -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["routed", "all", "topk=4", "auto(min_tokens=100000)"])
def test_policies(policy, default_model, tmp_path):
    samples, seq_len = 4, 32
    tokens = samples * seq_len
    report = moedsl.quantize(out=tmp_path / "out", policy=policy, group_size=32, samples=samples, seq_len=seq_len,
                             progress=False)
    data = _report(tmp_path / "out")
    assert data["policy"] == str(report.policy)
    top_k = json.loads((Path(default_model) / "config.json").read_text())["num_experts_per_tok"]
    moe_layers = _moe_layers(data)
    assert moe_layers
    for i in moe_layers:
        t = _moe_gate_up(data, i)
        counts = t["tokens"]
        assert len(counts) == t["matrices"]  # one count per expert
        if policy in ("all", "auto(min_tokens=100000)"):
            assert counts == [tokens] * len(counts), (policy, i, counts)
            assert t["no_tokens"] == []
        elif policy == "routed":
            assert sum(counts) == tokens * top_k, (i, counts)
        else:  # topk=4: the router's 4 best per token
            assert sum(counts) == tokens * 4, (i, counts)
        assert data["layers"][i]["stages"]
        for s in data["layers"][i]["stages"]:
            assert s["error"] <= s["rtn_error"] * 1.0001


# ---- 3. the writers' output, read back independently -------------------------------------------


def _modules(report: dict) -> list[str]:
    """An attention linear of layer 0 and an expert's gate/up/down of the first MoE layer."""
    i = _moe_layers(report)[0]
    return ["model.layers.0.self_attn.q_proj", f"model.layers.{i}.self_attn.o_proj",
            f"model.layers.{i}.mlp.experts.3.gate_proj", f"model.layers.{i}.mlp.experts.3.up_proj",
            f"model.layers.{i}.mlp.experts.3.down_proj"]


def _unpack_all(out: Path, fmt: str, modules: list[str]) -> dict[str, dict]:
    tensors = read_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    if fmt == "gptq":
        qc = json.loads((out / "quantize_config.json").read_text())
        assert qc == config["quantization_config"]
        return {m: dequantize_gptq(tensors, m, qc) for m in modules}
    return {m: dequantize_ct(tensors, m, config["quantization_config"]) for m in modules}


def _check_against_original(name: str, d: dict, W: np.ndarray, bits: int = 4) -> dict:
    assert d["weight"].shape == W.shape, name
    assert (d["scales"] > 0).all(), name
    assert d["codes"].min() >= 0 and d["codes"].max() < 2**bits, name
    step = d["scales"][:, d["g_idx"]]  # [out, in]: the quantization step of each weight
    dev = np.abs(d["weight"] - W) / step
    # GPTQ's error feedback may move a weight more than one step from the original (round to
    # nearest never would): on this model up to ~2.5 steps; on average well under half a step.
    assert dev.mean() < 0.5, (name, dev.mean())
    assert dev.max() <= 4.0, (name, dev.max())
    rel = np.linalg.norm(d["weight"] - W) / np.linalg.norm(W)
    assert rel < 0.2, (name, rel)
    return {"mean_steps": float(dev.mean()), "max_steps": float(dev.max()), "rel": float(rel)}


def test_writers_round_trip(gptq_out, ct_out, default_weights):
    modules = _modules(_report(gptq_out))
    g = _unpack_all(gptq_out, "gptq", modules)
    c = _unpack_all(ct_out, "compressed-tensors", modules)
    print()
    for m in modules:
        W = default_weights[m + ".weight"].float().numpy()
        sg = _check_against_original(m, g[m], W)
        sc = _check_against_original(m, c[m], W)
        # sym 4-bit: the zero-point is 8 in both formats
        assert (g[m]["zeros"] == 8).all() and (c[m]["zeros"] == 8).all()
        np.testing.assert_array_equal(g[m]["g_idx"], c[m]["g_idx"])
        steps = np.abs(g[m]["weight"] - c[m]["weight"]) / g[m]["scales"][:, g[m]["g_idx"]]
        codes_equal = float((g[m]["codes"] == c[m]["codes"]).mean())
        print(f"{m}: gptq {sg}  ct {sc}  max|gptq-ct| {steps.max():.2f} steps  codes equal {codes_equal:.4f}")
        # Same run options, same GPTQ — but GPTQ stores float16 scales and compressed-tensors the
        # model dtype (float32 here), and the quantizer rounds its scales to the format's dtype, so the
        # two solves differ by that rounding (and GPTQ's error feedback carries a flipped code along the
        # row): codes agree almost everywhere. The exact equality is test_writers_equal_when_scale_dtype_equal.
        # Only layer 0 sees the same inputs in both runs; later layers are calibrated on the outputs
        # of differently quantized earlier layers, so there the two runs legitimately drift apart.
        if m.startswith("model.layers.0."):
            assert codes_equal > 0.95, (m, codes_equal)
            assert steps.max() <= 4.0, (m, steps.max())


def test_writers_equal_when_scale_dtype_equal(tmp_path, tiny_model):
    """With a float16 model both formats store float16 scales: the same GPTQ result, bit for bit,
    only packed differently (read back by the independent unpacker)."""
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "fp16"
    shutil.copytree(tiny_model("qwen3_moe"), model)
    for f in model.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(f),
                  metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    cfg["dtype"] = "float16"
    (model / "config.json").write_text(json.dumps(cfg))
    kw = dict(model=model, group_size=32, samples=4, seq_len=32, progress=False)
    moedsl.quantize(out=tmp_path / "g", **kw)
    moedsl.quantize(out=tmp_path / "c", format="compressed-tensors", **kw)
    ct_tensors = read_checkpoint(tmp_path / "c")
    assert ct_tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
    modules = _modules(_report(tmp_path / "g"))
    g = _unpack_all(tmp_path / "g", "gptq", modules)
    c = _unpack_all(tmp_path / "c", "compressed-tensors", modules)
    for m in modules:
        np.testing.assert_array_equal(g[m]["codes"], c[m]["codes"], err_msg=m)
        np.testing.assert_array_equal(g[m]["scales"], c[m]["scales"], err_msg=m)
        np.testing.assert_array_equal(g[m]["weight"], c[m]["weight"], err_msg=m)


# ---- 4. resume -------------------------------------------------------------------------------

_TIMING = {"seconds", "host_peak_bytes", "peak_gpu_bytes", "phases", "phases_s", "phase_peak_gpu_gib"}


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in _TIMING}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def test_resume_after_kill_is_byte_identical(tmp_path, gptq_out, cli):
    out = tmp_path / "resumed"
    r = cli("quantize", "--out", str(out), *RUN_ARGS, "--resume-interval", "0",
            env={"MOEDSL_TEST_STOP": "layer:1:start"})  # SIGKILLs itself
    assert r.returncode == -9, r.stderr
    assert (out / ".moedsl-run" / "state.json").is_file()
    assert json.loads((out / ".moedsl-run" / "state.json").read_text())["finished"] == 1
    assert (out / "layer-00000.safetensors").is_file()
    assert not (out / "layer-00001.safetensors").exists()
    assert not (out / "config.json").exists()

    r = cli("quantize", "--out", str(out), *RUN_ARGS)
    assert r.returncode == 0, r.stderr
    assert not (out / ".moedsl-run").exists()

    fresh = {p.name for p in gptq_out.iterdir()}
    resumed = {p.name for p in out.iterdir()}
    assert resumed == fresh
    for name in sorted(fresh - {REPORT}):
        assert (out / name).read_bytes() == (gptq_out / name).read_bytes(), name
    a, b = _strip_timing(_report(out)), _strip_timing(_report(gptq_out))
    assert a["options"].pop("out") == str(out) and b["options"].pop("out") == str(gptq_out)
    assert a == b


# ---- 5. bad input ----------------------------------------------------------------------------


def _bad(capsys, *args: str) -> str:
    """Run the CLI in-process: it must return 2 (an exception escaping here would be a traceback)."""
    rc = cli_main(["quantize", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_bad_bits_subprocess(tmp_path, cli, default_model):
    r = cli("quantize", "--out", str(tmp_path / "o"), "--bits", "9", *RUN_ARGS)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "bits" in r.stderr and "9" in r.stderr
    assert not (tmp_path / "o" / "config.json").exists()


def test_bad_model_dir(tmp_path, capsys):
    err = _bad(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *RUN_ARGS)
    assert "--model" in err and "nope" in err


def test_bad_policy(tmp_path, capsys, default_model):
    err = _bad(capsys, "--policy", "bogus", "--out", str(tmp_path / "o"), *RUN_ARGS)
    assert "bogus" in err and "routed" in err


def test_bad_calib_line(tmp_path, capsys, default_model):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"input_ids": list(range(40))}) + "\n" + '{"input_ids": [1, 2,\n')
    err = _bad(capsys, "--calib", str(calib), "--out", str(tmp_path / "o"), *RUN_ARGS)
    assert f"{calib}:2:" in err, err  # file:line:col
    assert not list((tmp_path / "o").glob("*.safetensors"))  # failed before any shard


def _in_features(model_dir: Path) -> set[int]:
    from safetensors import safe_open

    sizes = set()
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k.startswith("model.layers.") and k.endswith("proj.weight"):
                    sizes.add(fh.get_slice(k).get_shape()[1])
    return sizes


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_bad_group_size_fails_before_writing(tmp_path, capsys, default_model, fmt):
    sizes = _in_features(default_model)
    group = next(g for g in (96, 48, 80, 112) if any(n % g for n in sizes))
    out = tmp_path / "o"
    err = _bad(capsys, "--group-size", str(group), "--format", fmt, "--out", str(out), "--samples", "4",
               "--seq-len", "32", "--no-progress")
    assert f"group_size {group}" in err
    assert "self_attn.q_proj" in err  # names the offending targets...
    assert "in_features" in err  # ...and their sizes
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())  # no shard, no state


def test_group_size_128_on_default_model(tmp_path, capsys, default_model):
    """--group-size 128 (the CLI default): works when 128 divides every in_features of the default
    model, else fails up front like any other misfit group size."""
    sizes = _in_features(default_model)
    out = tmp_path / "o"
    rc = cli_main(["quantize", "--group-size", "128", "--out", str(out), "--samples", "2", "--seq-len", "16",
                   "--no-progress"])
    err = capsys.readouterr().err
    if all(n % 128 == 0 for n in sizes):
        assert rc == 0, err
        assert (out / "config.json").is_file()
    else:
        assert rc == 2 and "group_size 128" in err
        assert not out.exists() or not any(out.iterdir())


def test_finished_output_needs_overwrite(gptq_out, capsys, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in gptq_out.iterdir()}
    err = _bad(capsys, "--out", str(gptq_out), *RUN_ARGS)
    assert "--overwrite" in err and str(gptq_out) in err
    assert {p.name: p.stat().st_mtime_ns for p in gptq_out.iterdir()} == before  # untouched


# ---- 6. every architecture -------------------------------------------------------------------


def _model_types() -> list[str]:
    from moedsl.lang.library import all_definitions

    return sorted({d.header.matches[0] for d in all_definitions()})


# Known failures, each understood (see the reasons); a strict xfail turns a fix into a reminder.
XFAIL: dict[str, str] = {}  # every architecture of the library quantizes end to end


@pytest.mark.parametrize("model_type", _model_types())
def test_every_architecture(model_type, tiny_model, tmp_path):
    from moedsl.models.tiny import available_tiny

    if not available_tiny((model_type,)):
        pytest.skip(f"transformers {transformers.__version__} has no `{model_type}` (a newer model type)")
    if model_type in XFAIL:
        pytest.xfail(XFAIL[model_type])
    from moedsl.models.tiny import COMPOSITE_TINY

    if model_type in COMPOSITE_TINY:
        pytest.skip("a composite model: quantized under `all` and `routed` in tests/test_composite.py")
    model = tiny_model(model_type)
    out = tmp_path / "out"
    report = moedsl.quantize(model=model, out=out, group_size=-1, samples=4, seq_len=32, progress=False)
    assert (out / "config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert any(k.endswith(".qweight") for k in index["weight_map"])
    assert report.layers and all(l["stages"] for l in report.layers)
    for layer in report.layers:
        for s in layer["stages"]:
            assert s["error"] <= s["rtn_error"] * 1.0001 + 1e-12, (model_type, layer["layer"], s["stage"])


def test_park_moves_what_is_outside_the_layers_but_nothing_a_layer_holds(tiny_model):
    """`park` (the embeddings and head leave a GPU between the capture and the head) takes every parameter
    outside the decoder layers, except one a layer also holds; `unpark` puts them back where they were."""
    from transformers import AutoModelForCausalLM

    from moedsl.execute.run import park, unpark

    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3_moe", num_hidden_layers=2))
    model.model.layers[1].shared_norm = model.model.norm  # a module the model and a layer share
    parked = park(model, "model.layers", torch.device("cpu"))
    ids = {id(p) for p in parked}
    assert id(model.model.embed_tokens.weight) in ids and id(model.lm_head.weight) in ids
    assert id(model.model.norm.weight) not in ids  # a layer holds it
    assert not ids & {id(p) for p in model.model.layers.parameters()}
    unpark(parked, torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())
