"""Experts in grouped containers (JetMoE's "parallel experts"): a container holds E Linears as one
[E, out, in] `weight` and is called as `container(rows, sizes)`, the routed rows sorted by expert.

Two constructs: `NAME:N:grouped` (a staged container whose experts are quantized with the rows the model
routes to them: JetMoE's mixture of attention) and a `:moe` block that holds its experts' tensors itself
with `call(rows, sizes)` (JetMoE's MoE, where the routing policy applies). The library's `jetmoe`
definition uses both. Tiny model from transformers' config; runs use 4 × 32 tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moedsl
from moedsl.errors import MoedslError
from moedsl.lang.library import LIBRARY_DIR
from moedsl.lang.parser import parse
from moedsl.lang.resolve import check

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_gptq, read_checkpoint  # noqa: E402

RUN = dict(group_size=-1, samples=4, seq_len=32, progress=False)
JETMOE = (LIBRARY_DIR / "jetmoe.moedef").read_text()
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    assert old in JETMOE
    path = tmp_path / "jetmoe_variant.moedef"
    path.write_text(JETMOE.replace(old, new))
    return path


def _problems(path: Path) -> str:
    reports = moedsl.validate(path)
    assert not reports[0].ok
    return "\n".join(reports[0].problems)


# ---- validate: the containers' contract and the expert function, checked numerically -------------


def test_jetmoe_validates_every_container():
    (report,) = moedsl.validate("jetmoe")
    assert report.ok, report.problems
    detail = next(c.detail for c in report.checks if c.name == "expert function")
    for container in ("self_attention.experts.input_linear", "self_attention.experts.output_linear",
                      "mlp.input_linear", "mlp.output_linear"):
        assert f"`{container}` (rows, sizes) rel. error" in detail
    ckpt = next(c.detail for c in report.checks if c.name == "checkpoint names")
    assert ckpt == "5 checkpoint keys found"  # kv_proj, the two attention containers, the two MoE tensors


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("concat(gate, up)", "concat(up, gate)", "the declared expert function does not match what JetMoeMoE's containers"),
    ("fn glu(silu)", "fn glu(gelu)", "the declared expert function does not match what JetMoeMoE's containers"),
    ("input_linear:0:grouped", "input_linear:0",
     "is `input_linear:0:grouped`"),
    ("tensor output_linear.weight [E,out,in] down", "tensor output_linear.weight [E,in,out] down",
     "is the layout transposed?"),
])
def test_wrong_declarations_fail_validate(old, new, needle, tmp_path):
    assert needle in _problems(_variant(tmp_path, old, new))


def test_a_container_whose_weight_is_transposed_fails_the_contract_check(tmp_path):
    """A container that multiplies expert e's rows by weight[e] instead of its transpose has square weights
    that bind under either layout: only calling it as (rows, sizes) tells them apart."""
    from moedsl.bind.validate import grouped_contract_error

    gen = torch.Generator().manual_seed(0)

    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, rows, sizes):
            return torch.cat([part @ self.weight[e] for e, part in enumerate(rows.split(sizes))])

    c = Transposed()
    assert grouped_contract_error(c, c.weight.detach(), gen) > 1e-2
    assert grouped_contract_error(c, c.weight.detach().transpose(1, 2), gen) < 1e-6


@pytest.mark.parametrize(("text", "message"), [
    ("mlp:moe { router:router tensor w.weight [E,out,in] concat(gate, up) :2 tensor v.weight [E,out,in] down :3 "
     "fn glu(silu) }", "they sit in grouped containers, declared with `call(rows, sizes)`"),
    ("mlp:moe { router:router experts:experts { tensor w [E,out,in] concat(gate, up) :2 tensor v [E,out,in] down :3 "
     "fn glu(silu) call(rows, sizes) } }", "`call(rows, sizes)` is for experts in grouped containers of the `:moe` block"),
    ("mlp:moe { tensor weight [E,out,in] concat(gate, up) :2 tensor v.weight [E,out,in] down :3 fn glu(silu) "
     "call(rows, sizes) }", "is `CONTAINER.PARAMETER`"),
    ("mlp:moe { tensor w.weight [E,out,in] concat(gate, up) :2 tensor v.weight [E,out,in] down :3 fn glu(silu) "
     "call(rows, sizes) extra identity(2) }", "`extra` slots need the chosen experts"),
    ("mlp:moe { x:experts { tensor w [E,out,in] concat(gate, up) :2 tensor v [E,out,in] down :3 fn glu(silu) } "
     "tensor y.weight [E,out,in] up :2 call(rows, sizes) }", "holds expert items itself and has an `:experts` module"),
    ("attn { experts:grouped }", "is one staged module"),
])
def test_grouped_errors(text, message):
    source = f"arch g\nexperts 4\ntop_k 2\nlayers model.layers\nlayer all otherwise {{ {text} }}\n"
    with pytest.raises(MoedslError) as err:
        check(parse(source))
    assert message in err.value.render()


def test_call_rows_sizes_takes_nothing_else():
    with pytest.raises(MoedslError, match="called as `call\\(rows, sizes\\)`, with nothing else"):
        parse("arch g\nlayers model.layers\nlayer all otherwise { mlp:moe { call(hidden, rows, sizes) } }\n")


# ---- quantize: all and routed, and the checkpoint loads back -----------------------------------------


def _loaded_with_dequantized(out: Path, src: Path):
    """The output through transformers' own loader (without the GPTQ kernel: quantization config removed), its
    grouped containers filled in from the independent reader's dequantization of the per-expert tensors."""
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text())
    plain = out.parent / f"{out.name}-plain"
    plain.mkdir()
    for f in out.iterdir():
        if f.name != "config.json":
            (plain / f.name).symlink_to(f)
    (plain / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    model, info = AutoModelForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert all(k.endswith(QUANT_SUFFIXES) for k in info["unexpected_keys"]), info["unexpected_keys"][:5]
    written = read_checkpoint(out)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    params = dict(model.named_parameters())
    inter = config["intermediate_size"]
    rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter), "down_proj": slice(None)}
    filled = set()
    with torch.no_grad():
        for name in (k.removesuffix(".qweight") for k in written if k.endswith(".qweight")):
            W = torch.from_numpy(dequantize_gptq(written, name, qcfg)["weight"])
            parts = name.split(".")
            if parts[-1].isdigit():  # an attention container's expert: self_attention.experts.input_linear.{e}
                weight, e, role = ".".join(parts[:-1]) + ".weight", int(parts[-1]), None
            elif parts[-2].isdigit():  # the MoE: mlp.input_linear.{e}.gate_proj / up_proj, mlp.output_linear.{e}.down_proj
                weight, e, role = ".".join(parts[:-2]) + ".weight", int(parts[-2]), parts[-1]
            else:  # an nn.Linear
                weight, e, role = name + ".weight", None, None
            target = params[weight] if e is None else params[weight][e] if role is None else params[weight][e, rows[role]]
            target.copy_(W)
            filled.add(weight)
    # the only weights transformers could not place are those of the quantized modules, all filled in here
    assert info["missing_keys"] and set(info["missing_keys"]) <= filled
    assert sum(k.endswith(("input_linear.weight", "output_linear.weight")) for k in filled) == \
        4 * config["num_hidden_layers"]
    return model


@pytest.mark.parametrize("policy", ["all", "routed"])
def test_jetmoe_quantizes_and_loads_back(policy, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("jetmoe")
    out = tmp_path / "out"
    report = moedsl.quantize(model=src, out=out, policy=policy, **RUN)
    config = json.loads((src / "config.json").read_text())
    E, k = config["num_local_experts"], config["num_experts_per_tok"]
    tokens = RUN["samples"] * RUN["seq_len"]
    data = json.loads((out / "moedsl-report.json").read_text())
    for layer in data["layers"]:
        targets = {t["id"]: t for s in layer["stages"] for t in s["targets"]}
        moa = targets["self_attention.experts.input_linear.{e}"]
        assert len(moa["tokens"]) == E and sum(moa["tokens"]) == tokens * k  # the rows the model routed
        assert targets["self_attention.experts.output_linear.{e}"]["tokens"] == moa["tokens"]
        gate = targets["mlp.input_linear.{e}.gate_proj"]
        if policy == "all":  # the policy reaches the grouped MoE experts: every expert, every token
            assert gate["tokens"] == [tokens] * E
        else:
            assert sum(gate["tokens"]) == tokens * k
        for s in layer["stages"]:
            assert s["error"] <= s["rtn_error"] * 1.0001 + 1e-12
    assert report.layers

    written = read_checkpoint(out)
    quantized = {k.removesuffix(".qweight") for k in written if k.endswith(".qweight")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        assert {f"{p}self_attention.experts.{c}.{e}" for c in ("input_linear", "output_linear") for e in range(E)} \
            <= quantized
        assert {f"{p}mlp.input_linear.{e}.{r}" for e in range(E) for r in ("gate_proj", "up_proj")} <= quantized
        assert {f"{p}mlp.output_linear.{e}.down_proj" for e in range(E)} <= quantized
        assert f"{p}self_attention.kv_proj" in quantized
        # the fused weights are replaced by their per-expert forms; the biases and routers are copied
        assert not any(key.startswith(p) and key.endswith(("input_linear.weight", "output_linear.weight"))
                       for key in written)
        assert {f"{p}mlp.bias", f"{p}self_attention.experts.bias", f"{p}mlp.router.layer.weight"} <= set(written)

    loaded = _loaded_with_dequantized(out, src)
    original = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = original(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    rel = ((b - a).norm() / a.norm()).item()
    assert 0 < rel < 0.25, rel
    assert np.isfinite(b.numpy()).all()


def test_the_documented_example_validates_against_jetmoe(tmp_path):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    body = next(b for b in re.findall(r"```moedef\n(.*?)```", doc, re.S) if "arch jetmoe_example" in b)
    path = tmp_path / "jetmoe_example.moedef"
    path.write_text(body)
    (report,) = moedsl.validate(path)
    assert report.ok, report.problems
