"""Weightless router slots (`extra identity(N)` / `extra zero(N)`): LongCat-Flash's router picks among
E experts and Z "zero-computation" slots that return their input. They are routed to under every
policy, never get statistics, and their unused rows of the fused tensor are copied as they are.

The definition here covers LongCat's MoE block only (attention and dense MLPs run unquantized), so
that it needs nothing beyond the construct under test; runs use 4 × 16 tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moedsl
from moedsl.errors import MoedslError
from moedsl.lang.parser import parse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import read_checkpoint  # noqa: E402

DEF = """
arch longcat_moe_only
match "longcat_flash"
experts config.n_routed_experts
top_k config.moe_topk
layers model.layers

layer all otherwise {
  input_layernorm:!
  post_attention_layernorm:!
  self_attn:!
  mlps:!
  mlp:moe {
    router:router
    experts:experts {
      tensor gate_up_proj [E,out,in] concat(gate, up) :0
      tensor down_proj [E,out,in] down :1
      fn glu(silu)
      extra SLOTS(config.zero_expert_num)
      ckpt gate "mlp.experts.{e}.gate_proj"
      ckpt up "mlp.experts.{e}.up_proj"
      ckpt down "mlp.experts.{e}.down_proj"
    }
  }
}
"""
TOKENS = 4 * 16


def _definition(tmp_path: Path, slots: str = "identity") -> Path:
    path = tmp_path / "longcat_moe.moedef"
    path.write_text(DEF.replace("SLOTS", slots))
    return path


def test_validate_checks_the_slots_numerically(tmp_path):
    report = moedsl.validate(_definition(tmp_path))[0]
    assert report.ok, report.problems
    # declared as zero slots, the expert function no longer matches LongCat's forward (which returns the input)
    wrong = moedsl.validate(_definition(tmp_path, "zero"))[0]
    assert not wrong.ok
    assert "the declared expert function does not match LongcatFlashExperts.forward" in "\n".join(wrong.problems)


def test_without_the_slots_the_extra_rows_are_an_error(tmp_path):
    path = tmp_path / "no_slots.moedef"
    path.write_text(DEF.replace("      extra SLOTS(config.zero_expert_num)\n", ""))
    problems = "\n".join(moedsl.validate(path)[0].problems)
    assert "`mlp.experts.gate_up_proj` (LongcatFlashExperts, [10, 64, 64])" in problems


@pytest.mark.parametrize("policy", ["routed", "all", "topk=3", "auto(min_tokens=4)"])
def test_quantize_with_identity_slots(policy, tiny_model, tmp_path):
    from moedsl.models.tiny import tiny_config

    cfg = tiny_config("longcat_flash")
    E, Z, k = cfg.n_routed_experts, cfg.zero_expert_num, cfg.moe_topk
    src = tiny_model("longcat_flash")
    out = tmp_path / "out"
    # --engine none: what the source stores is written (for vLLM the slots' tensors are left out, test_engines)
    report = moedsl.quantize(model=src, out=out, definition=str(_definition(tmp_path)), group_size=-1, samples=4,
                             seq_len=16, policy=policy, progress=False, engine="none")
    for layer in report.layers:
        gate_up = next(t for s in layer["stages"] for t in s["targets"] if "gate" in t["id"])
        assert len(gate_up["tokens"]) == E  # statistics for the E experts only, none for the slots
        if policy == "all":
            assert gate_up["tokens"] == [TOKENS] * E
        elif policy == "routed":
            # some of the T·k choices went to identity slots, which have no statistics
            assert 0 < sum(gate_up["tokens"]) < TOKENS * k
        elif policy.startswith("topk"):
            assert sum(gate_up["tokens"]) == TOKENS * 3  # top-3 among the experts with weights
    # the unused gate/up rows of the slots are copied as the checkpoint stores them
    written = read_checkpoint(out)
    source = {}
    for shard in src.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            source.update({key: fh.get_tensor(key) for key in fh.keys()})
    slot_keys = [key for key in source if any(f".experts.{e}." in key for e in range(E, E + Z))]
    assert slot_keys
    for key in slot_keys:
        assert torch.equal(written[key], source[key]), key
    assert not any(f".experts.{e}.down_proj" in key for key in written for e in range(E, E + Z))


@pytest.mark.parametrize("text, message", [
    ("extra idenity(2)", "unknown extra slot `idenity`"),
    ("extra identity(-1)", "`extra identity(...)` must be a non-negative integer"),
])
def test_slot_errors(text, message, tmp_path):
    path = tmp_path / "bad.moedef"
    path.write_text(DEF.replace("extra SLOTS(config.zero_expert_num)", text))
    try:
        problems = "\n".join(moedsl.validate(path)[0].problems)
    except MoedslError as err:
        problems = err.render()
    assert message in problems and "bad.moedef:" in problems


def test_extra_outside_experts_is_refused():
    from moedsl.lang.resolve import resolve

    with pytest.raises(MoedslError) as exc:
        resolve(parse("arch a\nlayers model.layers\nlayer x otherwise {\n  extra identity(1)\n}\n", "e.moedef"))
    assert "`extra` belongs directly inside an `:experts` module" in exc.value.render()
