"""Models that ship their own modeling code (config.json's `auto_map`) and `--trust-remote-code`.

The family is Lumen-MoE, written for these tests as a model repository would ship it
(tests/data/remote_moe/: a config class, a decoder with a linear router, fused experts and a
shared expert) with its definition `lumen_moe.moedef`. The model directory is built the way such a
repository is made: config.json with `auto_map`, the classes loaded by transformers with
`trust_remote_code=True`, small random weights, `save_pretrained` (which copies the code files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moedsl
from moedsl.cli import main as cli_main
from moedsl.errors import MoedslError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_gptq, read_checkpoint  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "remote_moe"
DEFINITION = DATA / "lumen_moe.moedef"
CODE = ("configuration_lumen_moe.py", "modeling_lumen_moe.py")
AUTO_MAP = {"AutoConfig": "configuration_lumen_moe.LumenMoeConfig",
            "AutoModelForCausalLM": "modeling_lumen_moe.LumenMoeForCausalLM"}
SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, bos_token_id=256,
             eos_token_id=257, pad_token_id=258)
RUN = dict(group_size=16, samples=4, seq_len=32, progress=False)  # 16 divides every in_features (64, 32, 48, 96)
FLAG = "--trust-remote-code"


def write_code_dir(directory: Path, **config) -> Path:
    """A directory with the family's code and a config.json naming it in `auto_map` (no weights)."""
    directory.mkdir(parents=True)
    for name in CODE:
        shutil.copyfile(DATA / name, directory / name)
    data = {"model_type": "lumen_moe", "architectures": ["LumenMoeForCausalLM"], "auto_map": AUTO_MAP,
            **SIZES, **config}
    (directory / "config.json").write_text(json.dumps(data, indent=2))
    return directory


@pytest.fixture(scope="module")
def lumen(tmp_path_factory) -> Path:
    """A saved Lumen-MoE checkpoint: layer 0 dense, layers 1-2 MoE, its code beside the weights."""
    from transformers import AutoConfig

    from moedsl.models.default import save_byte_tokenizer
    from moedsl.models.tiny import build_model, quiet_transformers

    root = tmp_path_factory.mktemp("lumen")
    code = write_code_dir(root / "code")
    config = AutoConfig.from_pretrained(code, trust_remote_code=True)
    model = build_model(config, "cpu", seed=0, trust_remote_code=True)  # routers spread, as for built-in families
    out = root / "model"
    with quiet_transformers():
        model.save_pretrained(out)
    save_byte_tokenizer(out)
    assert {p.name for p in out.glob("*.py")} == set(CODE)  # save_pretrained copied the code
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.out, captured.err


# ---- refused without the flag ------------------------------------------------------------------


def test_quantize_refuses_without_the_flag(lumen, tmp_path, cli):
    out = tmp_path / "out"
    r = cli("quantize", "--model", str(lumen), "--def", str(DEFINITION), "--out", str(out), "--group-size", "16",
            "--samples", "4", "--seq-len", "32", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert FLAG in r.stderr
    assert "configuration_lumen_moe.py" in r.stderr and "modeling_lumen_moe.py" in r.stderr
    assert f"{lumen / 'config.json'}:" in r.stderr  # located: the auto_map entry
    assert not out.exists()  # refused before the output directory was made


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_refuse_without_the_flag(lumen, capsys, command):
    rc, _, err = _run_cli(capsys, command, str(DEFINITION), "--model", str(lumen))
    assert rc == 2, err
    assert FLAG in err and "modeling_lumen_moe.py" in err


def test_library_refuses_without_trust_remote_code(lumen, tmp_path):
    with pytest.raises(MoedslError) as info:
        moedsl.quantize(model=lumen, out=tmp_path / "out", definition=str(DEFINITION), **RUN)
    assert "trust_remote_code=True" in info.value.render()
    with pytest.raises(MoedslError, match="--trust-remote-code"):
        moedsl.validate(DEFINITION, model_dir=lumen)
    assert not (tmp_path / "out").exists()


# ---- validate and plan with it -----------------------------------------------------------------


def test_validate_passes_with_the_flag(lumen, capsys):
    (report,) = moedsl.validate(DEFINITION, model_dir=lumen, trust_remote_code=True)
    assert report.ok, report.problems
    assert report.model_type == "lumen_moe"
    assert [c.name for c in report.checks] == ["expressions", "structure", "expert function", "checkpoint names"]
    assert all(c.passed for c in report.checks)
    assert report.kinds == {"moe": [1, 2], "dense": [0]}
    assert report.remote_code == {name: _sha256(lumen / name) for name in CODE}
    rc, out, err = _run_cli(capsys, "validate", str(DEFINITION), "--model", str(lumen), FLAG)
    assert rc == 0, err
    assert "ok" in out and "modeling_lumen_moe.py" in out


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFINITION.read_text()
    assert old in text
    path = tmp_path / "variant.moedef"
    path.write_text(text.replace(old, new))
    return path


def test_expert_function_is_checked_against_the_remote_forward(lumen, tmp_path):
    """The declared fn is compared numerically with the model's own experts forward: a wrong
    activation or gate/up order fails, located at the definition."""
    for old, new in (("fn glu(silu)", "fn glu(gelu)"), ("concat(gate, up)", "concat(up, gate)")):
        (report,) = moedsl.validate(_variant(tmp_path, old, new), model_dir=lumen, trust_remote_code=True)
        check = {c.name: c for c in report.checks}["expert function"]
        assert not check.passed and not report.ok, (old, report)
        assert any("does not match LumenMoeExperts.forward" in p for p in report.problems)


def test_strictness_applies_to_remote_families(lumen, tmp_path):
    """Leaving the shared expert out of the definition leaves quantizable weights uncovered."""
    text = DEFINITION.read_text()
    start = text.index("    shared_expert:moe-share {")
    end = text.index("    }\n", start) + len("    }\n")
    path = tmp_path / "no_shared.moedef"
    path.write_text(text[:start] + text[end:])
    (report,) = moedsl.validate(path, model_dir=lumen, trust_remote_code=True)
    assert not report.ok
    assert any("shared_expert" in p for p in report.problems), report.problems


def test_validate_a_config_beside_its_code(tmp_path, capsys):
    """`--config FILE`: the code is looked for beside the file; no weights needed."""
    d = write_code_dir(tmp_path / "cfg")
    rc, _, err = _run_cli(capsys, "validate", str(DEFINITION), "--config", str(d / "config.json"))
    assert rc == 2 and FLAG in err, err
    (report,) = moedsl.validate(DEFINITION, config=d / "config.json", trust_remote_code=True)
    assert report.ok, report.problems
    assert set(report.remote_code) == set(CODE)


def test_plan_with_the_flag(lumen, capsys):
    rc, out, err = _run_cli(capsys, "plan", str(DEFINITION), "--model", str(lumen), FLAG, "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["arch"] == "lumen_moe" and plan["num_layers"] == 3


# ---- quantize, and load the result back --------------------------------------------------------


def _fused_name(key: str) -> tuple[str, int, str] | None:
    """`...mlp.experts.{e}.{gate,up,down}_proj` -> (fused parameter, e, role); None for other modules."""
    parts = key.split(".")
    if len(parts) > 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return ".".join(parts[:-2]), int(parts[-2]), parts[-1].removesuffix("_proj")
    return None


def dequantized_weights(out: Path) -> dict[str, np.ndarray]:
    """Quantized module name -> its weight as the independent reader dequantizes it."""
    tensors = read_checkpoint(out)
    qc = json.loads((out / "quantize_config.json").read_text())
    return {k.removesuffix(".qweight"): dequantize_gptq(tensors, k.removesuffix(".qweight"), qc)["weight"]
            for k in tensors if k.endswith(".qweight")}


def put_dequantized(model, weights: dict[str, np.ndarray], intermediate: int) -> set[str]:
    """Write dequantized weights into `model` (per-expert names into the fused tensors); the
    parameters written."""
    params = dict(model.named_parameters())
    written = set()
    with torch.no_grad():
        for name, w in weights.items():
            w = torch.from_numpy(w).to(torch.float32)
            fused = _fused_name(name)
            if fused is None:
                params[name + ".weight"].copy_(w)
                written.add(name + ".weight")
                continue
            experts, e, role = fused
            if role == "down":
                params[experts + ".down_proj"][e].copy_(w)
                written.add(experts + ".down_proj")
            else:
                rows = slice(0, intermediate) if role == "gate" else slice(intermediate, 2 * intermediate)
                params[experts + ".gate_up_proj"][e, rows].copy_(w)
                written.add(experts + ".gate_up_proj")
    return written


def load_back(out: Path):
    """The quantized checkpoint through transformers with trust_remote_code=True: the config and
    model classes from the output directory's own code, every stored tensor placed in the model
    (quantized modules dequantized by the independent reader)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "LumenMoeConfig"
    assert type(config).__module__.startswith(f"transformers_modules.{out.name}.")  # out's copy of the code
    assert config.quantization_config["quant_method"] == "gptq"
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    assert type(model).__module__.startswith(f"transformers_modules.{out.name}.")
    tensors = read_checkpoint(out)
    quantized = dequantized_weights(out)
    parts = (".qweight", ".qzeros", ".scales", ".g_idx")
    plain = {k: v for k, v in tensors.items() if not k.endswith(parts)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert not unexpected, unexpected
    written = put_dequantized(model, quantized, config.moe_intermediate_size)
    assert set(missing) == written  # every parameter came from the checkpoint, exactly once
    return model


@pytest.mark.parametrize("policy", ["all", "routed"])
def test_quantize_and_load_back(lumen, tmp_path, policy):
    from transformers import AutoModelForCausalLM

    from moedsl.models.tiny import quiet_transformers

    out = tmp_path / f"q{policy}"
    report = moedsl.quantize(model=lumen, out=out, definition=str(DEFINITION), trust_remote_code=True, policy=policy,
                             **RUN)
    # the output keeps the code and auto_map; the report says which code ran
    for name in CODE:
        assert (out / name).read_bytes() == (lumen / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "lumen_moe"
    data = json.loads((out / "moedsl-report.json").read_text())
    assert data["remote_code"]["trusted"] is True
    assert data["remote_code"]["files"] == {name: _sha256(lumen / name) for name in CODE}
    assert report.remote_code == data["remote_code"]
    # the policy reached the remote experts
    tokens = RUN["samples"] * RUN["seq_len"]
    for layer in (1, 2):
        (target,) = [t for s in data["layers"][layer]["stages"] for t in s["targets"]
                     if t["id"] == "mlp.experts.{e}.gate_proj"]
        if policy == "all":
            assert target["tokens"] == [tokens] * SIZES["num_experts"]
        else:
            assert sum(target["tokens"]) == tokens * SIZES["num_experts_per_tok"]
        for s in data["layers"][layer]["stages"]:
            assert s["error"] <= s["rtn_error"] * 1.0001

    loaded = load_back(out)
    with quiet_transformers():
        source = AutoModelForCausalLM.from_pretrained(lumen, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = source(input_ids=ids).logits
        weights = dequantized_weights(out)
        assert len(weights) == 3 * 4 + 2 * (3 * SIZES["num_experts"] + 3) + 3  # attention, experts, shared, dense
        put_dequantized(source, weights, SIZES["moe_intermediate_size"])  # the dequantized reference
        reference = source(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    rel = ((reference - original).norm() / original.norm()).item()
    print(f"\n{policy}: logits of the 4-bit model vs the original: relative difference {rel:.3e}")
    assert 0 < rel < 0.25


# ---- auto_map pointing where it must not ---------------------------------------------------------


def _bad_dir(tmp_path: Path, lumen: Path, change) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(lumen, d)
    data = json.loads((d / "config.json").read_text())
    change(d, data)
    (d / "config.json").write_text(json.dumps(data, indent=2))
    return d


def _outside(d: Path, data: dict) -> None:
    elsewhere = d.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(d / "modeling_lumen_moe.py", elsewhere / "modeling_lumen_moe.py")
    data["auto_map"]["AutoModelForCausalLM"] = f"{elsewhere}/modeling_lumen_moe.LumenMoeForCausalLM"


def _symlink_out(d: Path, data: dict) -> None:
    elsewhere = d.parent / "elsewhere.py"
    shutil.move(d / "modeling_lumen_moe.py", elsewhere)
    os.symlink(elsewhere, d / "modeling_lumen_moe.py")


def _other_repo(d: Path, data: dict) -> None:
    data["auto_map"]["AutoConfig"] = "lumen-org/lumen-moe--configuration_lumen_moe.LumenMoeConfig"


def _missing(d: Path, data: dict) -> None:
    data["auto_map"]["AutoModelForCausalLM"] = "modeling_lumen.LumenMoeForCausalLM"


def _missing_import(d: Path, data: dict) -> None:
    path = d / "modeling_lumen_moe.py"
    path.write_text(path.read_text().replace("from .configuration_lumen_moe import LumenMoeConfig",
                                             "from .configuration_lumen_moe import LumenMoeConfig\n"
                                             "from .lumen_kernels import fused_router"))


BAD = {
    "outside": (_outside, "config.json", "outside the model directory"),
    "symlink-outside": (_symlink_out, "config.json", "outside the model directory"),
    "other-repository": (_other_repo, "config.json", "another repository (`lumen-org/lumen-moe`)"),
    "missing-file": (_missing, "config.json", "`modeling_lumen.py`, which is not in the model directory"),
    "missing-import": (_missing_import, "modeling_lumen_moe.py", "imports `.lumen_kernels`, but lumen_kernels.py"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_auto_map_is_a_located_error(lumen, tmp_path, capsys, case):
    change, where, what = BAD[case]
    d = _bad_dir(tmp_path, lumen, change)
    rc, _, err = _run_cli(capsys, "validate", str(DEFINITION), "--model", str(d), FLAG)
    assert rc == 2, err
    assert what in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"{d / where}:"), first  # file:line:col ...
    line = int(first.split(":")[1])
    assert line > 1 and "^" in err  # ... of the offending entry, with a caret under it


def test_bad_auto_map_refused_by_quantize_before_any_output(lumen, tmp_path, capsys):
    d = _bad_dir(tmp_path, lumen, _missing)
    out = tmp_path / "out"
    rc, _, err = _run_cli(capsys, "quantize", "--model", str(d), "--def", str(DEFINITION), "--out", str(out), FLAG,
                          "--samples", "4", "--seq-len", "32", "--group-size", "16", "--no-progress")
    assert rc == 2 and "modeling_lumen.py" in err, err
    assert not out.exists()


def test_resume_requires_the_same_code(lumen, tmp_path, cli):
    """A killed run resumes only with the same code files: other code would give other results."""
    d = tmp_path / "model"
    shutil.copytree(lumen, d)
    out = tmp_path / "out"
    args = ("quantize", "--model", str(d), "--def", str(DEFINITION), "--out", str(out), FLAG, "--samples", "4",
            "--seq-len", "32", "--group-size", "16", "--no-progress", "--resume-interval", "0")
    r = cli(*args, env={"MOEDSL_TEST_STOP": "layer:1:start"})  # SIGKILLs itself after layer 0
    assert r.returncode == -9, r.stderr
    path = d / "modeling_lumen_moe.py"
    path.write_text(path.read_text() + "\n# patched after the run started\n")
    r = cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the source changed since the interrupted run: the model's own code files changed" in r.stderr
    assert not (out / "config.json").exists()


def test_broken_remote_code_is_located(lumen, tmp_path, capsys):
    """Code that does not even compile: the error points into the model directory's file."""
    d = tmp_path / "broken"
    shutil.copytree(lumen, d)
    path = d / "configuration_lumen_moe.py"
    lines = path.read_text().splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("class LumenMoeConfig"))
    lines[at] = "class LumenMoeConfig(PretrainedConfig)"  # no colon
    path.write_text("\n".join(lines) + "\n")
    rc, _, err = _run_cli(capsys, "validate", str(DEFINITION), "--model", str(d), FLAG)
    assert rc == 2, err
    assert err.startswith(f"{path}:{at + 1}:"), err
    assert "SyntaxError" in err


def test_failing_remote_forward_is_located(lumen, tmp_path):
    """An exception raised inside the model's own code during the run: a located error, not a traceback."""
    d = tmp_path / "failing"
    shutil.copytree(lumen, d)
    path = d / "modeling_lumen_moe.py"
    text = path.read_text()
    anchor = "        batch, seq, _ = hidden_states.shape\n        q = self.q_proj"
    assert anchor in text
    path.write_text(text.replace(anchor, "        raise RuntimeError('lumen attention kernel is not built')\n" + anchor))
    line = path.read_text().splitlines().index("        raise RuntimeError('lumen attention kernel is not built')") + 1
    with pytest.raises(MoedslError) as info:
        moedsl.quantize(model=d, out=tmp_path / "out", definition=str(DEFINITION), trust_remote_code=True, **RUN)
    rendered = info.value.render()
    assert rendered.startswith(f"{path}:{line}:"), rendered
    assert "lumen attention kernel is not built" in rendered


def test_known_model_type_keeps_built_in_classes(tiny_model, tmp_path, capsys):
    """A model_type transformers knows loads with its built-in classes without the flag, whatever
    its auto_map says (as in transformers); with the flag, the auto_map is what runs, and checked."""
    d = tmp_path / "qwen"
    shutil.copytree(tiny_model("qwen3_moe"), d)
    data = json.loads((d / "config.json").read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen_custom.QwenCustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(data, indent=2))
    (report,) = moedsl.validate("qwen3_moe", model_dir=d)
    assert report.ok and report.remote_code == {}
    rc, _, err = _run_cli(capsys, "validate", "qwen3_moe", "--model", str(d), FLAG)
    assert rc == 2 and "modeling_qwen_custom.py" in err, err


def test_docs_show_this_definition():
    """docs/language.md carries the definition these tests use, verbatim."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    assert DEFINITION.read_text() in doc
