"""The serving check: quantize tiny models of the library families, load each output in the engines
users serve with, compare with the source model carrying the dequantized weights, print a matrix.

    python3 scripts/serving/check.py --vllm-python V/bin/python --hf-python C/bin/python [--families a,b]

Run through scripts/check-serving.sh, which builds both venvs. For each family and format:

1. `save_tiny` a model of the family at serving-friendly widths (hidden 128, experts 64 wide:
   vLLM's int4 MoE path needs hidden % 128 == 0), with a composite's image processor (`save_processor`),
   and quantize it with moedsl (4-bit sym, g64).
   While quantizing, every decoder layer is captured as it leaves GPTQ: that is the source model
   carrying the dequantized weights, the reference.
2. vLLM (scripts/serving/vllm_probe.py): builds and loads the checkpoint, reports the tensors it
   never used and the parameters it never filled, and the routed experts as it loaded them; when
   its CPU int4 MoE kernel runs on this machine, prompt log-probs too.
3. transformers + compressed-tensors (scripts/serving/hf_probe.py, compressed-tensors outputs):
   unexpected/missing keys and prompt log-probs.

A cell is ✓ when nothing was left unused or unfilled, the experts vLLM holds equal the reference
ones, and log-probs (where computed) are within tolerance of the reference's. A known engine limit
(moedsl/write/engines.py `VLLM_FAMILY_LIMITS` and `TRANSFORMERS_FAMILY_LIMITS`; transformers for
families whose checkpoints store fused experts, `ckpt fused`; the vLLM build's own, `VLLM_BUILD_LIMITS`)
is ✗ with the engine's own error, and counts as expected; a limit that no longer fails is reported, so
the data stays true. Exit 0 when every cell is as expected.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the reference's log-probs are computed as the transformers probe computes the consumer's: the same forward (a
# composite without one of its own runs its thinker)
from hf_probe import logits_model, prompt_logprobs as logprobs  # noqa: E402

FORMATS = ("gptq", "compressed-tensors")
# library MoE families with a vLLM model class (vLLM 0.32), plain / shared-expert / fused-checkpoint
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "granitemoe", "dbrx", "gpt_oss")
CI_FAMILIES = ("qwen3_moe", "qwen2_moe", "gpt_oss")  # plain, shared experts, fused checkpoint (stacked for vLLM)
PROMPT = [(7 * i + 3) % 256 for i in range(24)]
VLLM_TOLERANCE = 0.05  # |Δ log-prob| vs the reference: vLLM computes in bf16
HF_TOLERANCE = 1e-3  # transformers decompresses to fp32
EXPERT_TOLERANCE = 1e-2  # max |Δw| / max |w|: scales reach vLLM's kernels in bf16

WIDE = {"hidden_size": 128, "d_model": 128}
DENSE = {"intermediate_size": 128, "ffn_hidden_size": 128, "dense_intermediate_size": 128,
         "intermediate_size_mlp": 128, "shared_expert_intermediate_size": 128,
         "shared_experts_intermediate_size": 128, "moe_shared_expert_intermediate_size": 128,
         "shared_intermediate_size": 128}
EXPERT = {"moe_intermediate_size": 64, "expert_ffn_hidden_size": 64}
LATENT = {"q_lora_rank": 128, "kv_lora_rank": 64}  # MLA low-rank inputs (deepseek): whole groups of 64, and
# different widths, since moedsl groups same-stage siblings of equal width under one statistics key
# config fields as the family's released checkpoints set them, where transformers' defaults differ and vLLM's
# own class follows the release (without them vLLM serves the family through its Transformers backend)
RELEASED = {"phimoe": {"attention_bias": True, "lm_head_bias": True}}  # Phi-3.5-MoE
# mamba widths at hidden 128: heads · head_dim = expand · hidden (transformers checks it), and in_proj's
# 2·d_inner + 2·groups·d_state + heads rows a multiple of 32 (vLLM's CPU linear kernel)
MAMBA = {"granitemoehybrid": {"mamba_n_heads": 16, "mamba_d_head": 16},  # 512 + 16 + 16
         "nemotron_h": {"mamba_num_heads": 32, "mamba_head_dim": 8}}  # 512 + 128 + 32


def serving_overrides(model_type: str) -> dict:
    """Widths that vLLM's int4 MoE path accepts, for the keys this family's tiny config has."""
    from moedsl.models.tiny import tiny_config

    base = tiny_config(model_type).to_dict()

    def fit(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                sub = fit(v)
                if sub:
                    out[k] = {**v, **sub}
            elif k in WIDE or k in DENSE or k in EXPERT or (k in LATENT and isinstance(v, int)):
                width = {**WIDE, **DENSE, **EXPERT, **LATENT}[k]
                # per-modality widths (ernie4_5_vl: [text, vision] experts) stay a list, apart as tiny_config keeps them
                out[k] = [width + 32 * j for j in range(len(v))] if isinstance(v, list) else width
        return out

    out = fit(base)
    # MLA: fused_qkv_a_proj has q_lora_rank + kv_lora_rank + rope rows, and vLLM's CPU linear kernel takes
    # multiples of 32 only (128 + 64 + 32 = 224); a composite's MLA is in its text_config (Kimi-K2.5's: 200 rows)
    if "qk_rope_head_dim" in base:
        out.update(mla_widths(base))
    elif isinstance(base.get("text_config"), dict) and "qk_rope_head_dim" in base["text_config"]:
        out["text_config"] = {**base["text_config"], **out.get("text_config", {}), **mla_widths(base["text_config"])}
    out.update(RELEASED.get(model_type, {}))
    out.update(MAMBA.get(model_type, {}))
    out["initializer_range"] = 0.08  # larger weights than the default init, so wrong ones show in log-probs
    return out


def mla_widths(base: dict) -> dict:
    """An MLA config's rotary part at 32 and the head widths that hold it (see serving_overrides)."""
    out = {"qk_rope_head_dim": 32}
    if "head_dim" in base:  # transformers' rotary width for MLA; or, where it is the whole q/k head (dots3's
        # sliding layers must have nope + rope), that
        whole = base["head_dim"] == base.get("qk_nope_head_dim", 0) + base["qk_rope_head_dim"]
        out["head_dim"] = base["qk_nope_head_dim"] + 32 if whole else 32
    if "qk_head_dim" in base:
        out["qk_head_dim"] = base["qk_nope_head_dim"] + 32
    if "index_head_dim" in base:  # the sparse-attention indexer's heads hold a rotary part of the same width
        # (transformers splits them at qk_rope_head_dim): wider than it, and whole multiples of 32
        out["index_head_dim"] = 64
    return out


def portable_config(src: Path) -> None:
    """transformers 5.24 saves `_name_or_path`/`output_attentions` inside nested sub-configs (dbrx's
    attn_config, ffn_config), which the transformers vLLM pins (5.19) refuses ("Found unknown
    kwargs"). Real checkpoints do not carry them; neither does this fixture."""
    path = src / "config.json"
    config = json.loads(path.read_text())
    for value in config.values():
        if isinstance(value, dict):
            for key in ("_name_or_path", "output_attentions"):
                value.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def quantize_with_reference(src: Path, out: Path, fmt: str, engine: str) -> dict[str, torch.Tensor]:
    """Quantize `src` into `out`; returns each decoder layer's state as GPTQ left it (runtime names)."""
    from moedsl.bind.binder import get_path
    from moedsl.execute import loader as loader_mod
    from moedsl.execute.run import quantize

    captured: dict[str, torch.Tensor] = {}
    original = loader_mod.LayerwiseLoader.unload_layer

    def unload_layer(self, model, i):
        path = self._layers_path  # the decoder layers the loader streams (a composite's text decoder's)
        for k, v in get_path(model, path)[i].state_dict().items():
            captured[f"{path}.{i}.{k}"] = v.detach().to("cpu", torch.float32, copy=True)
        return original(self, model, i)

    loader_mod.LayerwiseLoader.unload_layer = unload_layer
    try:
        quantize(model=src, out=out, format=fmt, group_size=64, samples=8, seq_len=32, policy="all",
                 progress=False, overwrite=True, device="cpu", engine=engine)
    finally:
        loader_mod.LayerwiseLoader.unload_layer = original
    return captured


def load_model(src: Path, state: dict[str, torch.Tensor] | None = None):
    """The source model (a composite's `…ForConditionalGeneration`, as moedsl loads it), with `state` in."""
    from transformers import AutoConfig

    from moedsl.models.tiny import model_class, quiet_transformers

    with quiet_transformers():
        model = model_class(AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32)
    if state:
        missing = [k for k in state if k not in model.state_dict()]
        if missing:
            raise RuntimeError(f"reference state names unknown to the model: {missing[:5]}")
        model.load_state_dict(state, strict=False)
    return model.eval()


def expected_experts(model) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer index: the reference experts in vLLM's stacked forms (w13 both orders, w2)."""
    from moedsl.bind.binder import get_path
    from moedsl.experts.weights import read
    from moedsl.lang.library import for_model
    from moedsl.plan.compiler import compile_plan
    from moedsl.plan.schema import Policy

    plan = compile_plan(for_model(model), model, policy=Policy.parse("all"), tokens=64)
    layers = get_path(model, plan.layers_path)
    out = {}
    for i in range(plan.num_layers):
        for moe in plan.kind_for_layer(i).moe:
            w, _ = read(moe.experts, get_path(layers[i], moe.experts.path))
            gate, up, down = (w[r].detach().float() for r in ("gate", "up", "down"))
            inter = torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0 u0 g1 u1 ...
            out[i] = {"concat": torch.cat([gate, up], 1), "interleave": inter, "w2": down}
    return out


def compare_experts(probe_dir: Path, info: dict, expected: dict) -> str | None:
    """None when every routed expert vLLM loaded equals the reference; else what differs."""
    from safetensors.torch import load_file

    got = load_file(str(probe_dir / "vllm-experts.safetensors"))
    if len(info) != len(expected):
        return f"vLLM holds {len(info)} routed-experts modules, the model {len(expected)}"
    for name, meta in info.items():
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        ref = expected[layer]
        order = "interleave" if "SWIGLUOAI" in meta["activation"] else "concat"
        for part, want in (("w13", ref[order]), ("w2", ref["w2"])):
            have = got[f"{name}.{part}"]
            if have.shape != want.shape:
                return f"{name}.{part}: vLLM holds {tuple(have.shape)}, reference {tuple(want.shape)}"
            err = float((have - want).abs().max() / want.abs().max())
            if err > EXPERT_TOLERANCE:
                return f"{name}.{part}: vLLM's experts differ from the quantized ones (max rel. {err:.3g})"
    return None


def trivial_g_idx(ckpt: Path, names: list[str]) -> list[str]:
    """The GPTQ `g_idx` tensors among `names` that hold the trivial i // group_size (desc_act false).
    vLLM's MoE method reads no g_idx then: such a tensor carries nothing it needs."""
    from safetensors import safe_open

    config = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
    if config.get("quant_method") != "gptq" or config.get("desc_act"):
        return []
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    group = config["group_size"]
    out = []
    for name in names:
        if not name.endswith(".g_idx") or name not in index:
            continue
        with safe_open(str(ckpt / index[name]), "pt") as f:
            g = f.get_tensor(name)
        want = torch.zeros_like(g) if group == -1 else torch.arange(g.numel(), dtype=g.dtype) // group
        if torch.equal(g, want):
            out.append(name)
    return out


def run_probe(python: str, script: str, ckpt: Path, out: Path, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([python, str(ROOT / "scripts" / "serving" / script), str(ckpt), str(out), json.dumps(PROMPT)],
                          capture_output=True, text=True, timeout=900)
    path = out / name
    if not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"probe died (exit {proc.returncode}): " + " | ".join(tail)}
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return json.loads(path.read_text())


def verdict(report: dict, ref_lp: list[float], tolerance: float, expert_problem: str | None = None) -> dict:
    if "error" in report:
        return {"ok": False, "cell": "✗", "why": report["error"]}
    problems = []
    if report.get("unused"):
        problems.append(f"{len(report['unused'])} tensor(s) unused, e.g. {report['unused'][0]}")
    if report.get("uninitialized"):
        problems.append(f"{len(report['uninitialized'])} parameter(s) not loaded, e.g. {report['uninitialized'][0]}")
    if report.get("mismatched"):
        problems.append(f"shape mismatch: {report['mismatched'][0]}")
    if expert_problem:
        problems.append(expert_problem)
    delta = None
    if report.get("logprobs") is not None:
        delta = max(abs(a - b) for a, b in zip(report["logprobs"], ref_lp))
        if delta > tolerance:
            problems.append(f"log-probs differ by {delta:.3g} (> {tolerance})")
    if problems:
        return {"ok": False, "cell": "✗", "why": "; ".join(problems), "delta": delta}
    if delta is None:
        return {"ok": True, "cell": "✓ load", "why": None}
    return {"ok": True, "cell": f"✓ Δ{delta:.3f}", "why": None, "delta": delta}


def definition_name(model_type: str) -> str:
    """The library definition a model of `model_type` binds to (the name engines.py keys limits by):
    `qwen3_5_moe_text` is `qwen3_5_moe`, `llama4_text` is itself."""
    from moedsl.lang.library import for_model
    from moedsl.models.tiny import tiny_config

    return for_model(tiny_config(model_type)).header.name


def fused_checkpoint(model) -> bool:
    """The family's checkpoints store fused experts (`ckpt fused`, inherited too: granitemoeshared's
    from granitemoe): transformers has no conversion from per-expert quantized tensors into its fused
    experts, unless it swaps them for per-expert modules when the checkpoint is quantized (llama4's
    experts become `SequentialLlama4TextExperts`, transformers/quantizers/base.py)."""
    from moedsl.lang.library import for_model
    from moedsl.plan.compiler import compile_plan
    from moedsl.plan.schema import Policy

    try:  # experts transformers rebuilds per expert for quantized checkpoints (Llama4TextExperts)
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as patched
    except ImportError:
        patched = {}
    per_expert = {cls for cls, how in patched.items()
                  if "compressed-tensors" in {getattr(m, "value", m) for m in how["quantization_methods"]}}
    plan = compile_plan(for_model(model), model, policy=Policy.parse("all"), tokens=64)
    return any(moe.experts.ckpt_fused and moe.experts.module_class not in per_expert
               for kind in plan.kinds for moe in kind.moe)


# transformers + compressed-tensors, for a family whose checkpoints store fused experts (`fused_checkpoint`)
FUSED_IN_TRANSFORMERS = (
    "transformers converts per-expert checkpoint tensors into fused experts only for families whose checkpoints are "
    "per-expert; this family's store them fused, and its conversion mapping reads only those fused tensors (Aria's "
    "renames experts.fc1.weight/fc2.weight to gate_up_proj/down_proj). Its fused experts are parameters, not Linear "
    "modules that compressed-tensors could give quantized weights (transformers rebuilds experts per expert for "
    "quantized checkpoints only where MODULES_TO_PATCH_FOR_QUANTIZATION names them: Llama4TextExperts), so the "
    "per-expert quantized tensors are UNEXPECTED in transformers' load report and the fused experts MISSING, left at "
    "their random init")
# transformers + compressed-tensors, for a composite with no forward of its own (hf_probe.logits_model)
NO_FORWARD = ("compressed-tensors decompresses a loaded model in a forward pre-hook on the model transformers returns "
              "(ModelCompressor.add_decompress_hook), at its first forward; this composite's text logits come from a "
              "sub-model run directly (Qwen3-Omni's class has no forward: its generate runs the thinker; Llama-4's "
              "forward fails after its causal LM returns, reading `image_outputs` off that output), so the hook never "
              "fires and the sub-model's first forward meets its still-packed linears")


def expect_limit(cell: dict, limit: str | None) -> dict:
    """Mark a cell that fails as a known engine limit predicts (or a limit that no longer holds)."""
    if limit is None:
        return cell
    if cell["ok"]:
        return {**cell, "ok": False, "cell": "✓ (limit stale)",
                "why": f"expected to fail ({limit}) but passed: update moedsl/write/engines.py"}
    kind = "not checkable here (this check's environment)" if limit in ENVIRONMENT_LIMITS else "engine limit"
    return {**cell, "ok": True, "expected": True, "why": f"{kind}: {limit}. Engine said: {cell['why']}"}


# limits of the vLLM this check runs (its CPU build; the transformers 5.19 it pins), not of the checkpoint: the
# model cannot even be built, so these cells cannot check loading here, and count as expected (the GPU build,
# or the release's own configuration code, gets past them). definition name -> (what vLLM's error says, a regular
# expression; why)
DSA = ("Sparse Attention is not supported on CPU", "vLLM's CPU build has no sparse-attention (DSA indexer) backend "
       "(vllm/platforms/cpu.py); its GPU builds have")
REMOTE_CONFIG = ("Transformers does not recognize this architecture", "vLLM 0.32 registers the model class but reads "
                 "the config through the transformers it pins (5.19), which has no config class for this model_type: "
                 "only configuration code shipped with the checkpoint (trust_remote_code) gets past it, and a fixture "
                 "saved by transformers 5.24 has none")
TORCHVISION = ("failed to be inspected|requires the Torchvision library",
               "vLLM's vision-language classes import torchvision (Unlimited-OCR's, DeepSeek-OCR's processor module "
               "at import), and transformers' video processors need it; this check's vLLM venv has none that runs: "
               "torch 2.13.0's torchvision (0.28.0) on PyPI, and in this machine's wheel mirror (the same file), is "
               "a CUDA build whose torchvision/_C.so links libtorch_cuda.so and libc10_cuda.so, which torch "
               "2.13.0+cpu does not ship (`operator torchvision::nms does not exist`), and its CPU build is "
               "published only on download.pytorch.org, which this machine cannot reach: the registry cannot "
               "inspect the class (`No module named 'torchvision'` in vLLM's log), or the processor vLLM builds "
               "from the checkpoint cannot be made")
# Qwen3-Omni's thinker saved as a model of its own (architecture Qwen3OmniMoeThinkerForConditionalGeneration)
THINKER = ("Qwen2VLVideoProcessor requires the Torchvision library",
           "vLLM 0.32 registers its Qwen3-Omni class for the whole omni's architecture only "
           "(Qwen3OmniMoeForConditionalGeneration), so it serves the thinker's through its Transformers backend "
           "(TransformersMultiModalMoEForCausalLM), which builds the checkpoint's processor, Qwen3OmniMoeProcessor; "
           "its video processor, Qwen2VLVideoProcessor, is torchvision-backed only in transformers, and this check's "
           "venv has no torchvision that runs (see TORCHVISION)")
# limits of where this check runs, not of vLLM or of the checkpoint: said as such in the cell
ENVIRONMENT_LIMITS = (TORCHVISION[1], THINKER[1])
VLLM_BUILD_LIMITS = {
    # relu² experts without a gate (`fn mlp(relu2)`): vLLM's FusedMoE refuses them on CPU at construction
    "nemotron_h": ("is_act_and_mul", "vLLM's CPU build has no MoE kernel for non-gated experts (is_act_and_mul=False); "
                   "its GPU builds have"),
    "deepseek_v32": DSA,
    "glm_moe_dsa": DSA,
    "sarvam_mla": REMOTE_CONFIG,
    "dots3_note_text": REMOTE_CONFIG,
    "mistral_large4": REMOTE_CONFIG,
    "qwen3_omni_moe_thinker": THINKER,
    **{name: TORCHVISION for name in ("llama4", "qwen3_vl_moe", "glm4v_moe", "qwen3_5_moe_vl", "qwen3_omni_moe",
                                      "ernie4_5_vl_moe", "unlimited_ocr")},
}


# parameters a vLLM class builds in dense layers too but reads only in MoE layers, which a checkpoint therefore
# need not carry there: definition name -> pattern on the parameter name, with the layer index as group 1
VLLM_UNREAD_IN_DENSE = {
    # vllm/.../models/AXK1.py builds post_mlp_layernorm in every decoder layer and applies it only after a sparse
    # MLP; transformers' AXK1 has it in the MoE block only
    "axk1": re.compile(r"\.layers\.(\d+)\.post_mlp_layernorm\.weight$"),
}


# checkpoint tensors a vLLM class maps to nothing on purpose (its hf_to_vllm_mapper), so never reads: definition
# name -> pattern on the tensor name
VLLM_DROPPED = {
    # vllm/.../models/aria.py AriaVisionTransformer: `orig_to_new_substr={"post_layernorm": None}` ("post_layernorm
    # is not used in Aria"), the vision tower's last norm replaced by an Identity
    "aria": re.compile(r"(^|\.)vision_tower\.post_layernorm\."),
}


def unread_params(name: str, uninitialized: list[str], moe_layers: set[int]) -> set[str]:
    """The parameters among `uninitialized` that vLLM's class for `name` never reads (VLLM_UNREAD_IN_DENSE)."""
    pattern = VLLM_UNREAD_IN_DENSE.get(name)
    if pattern is None:
        return set()
    return {p for p in uninitialized if (m := pattern.search(p)) and int(m.group(1)) not in moe_layers}


def check_family(family: str, work: Path, vllm_py: str, hf_py: str | None, formats=FORMATS) -> dict:
    from moedsl.errors import MoedslError
    from moedsl.models.tiny import save_processor, save_tiny
    from moedsl.write.engines import TRANSFORMERS_FAMILY_LIMITS, VLLM_FAMILY_LIMITS

    row: dict = {}
    no_processor = None  # why the fixture has no image processor, where it has none (said in the vLLM cells)
    try:
        src = save_tiny(family, work / family / "src", seed=0, **serving_overrides(family))
        try:  # a composite's processor files, which moedsl copies into its outputs and vLLM reads
            save_processor(family, src)
        except MoedslError as exc:
            no_processor = f"the fixture has no preprocessor_config.json: {exc.message}: {'; '.join(exc.notes)}"
        name = definition_name(family)
        portable_config(src)
        source_lp = logprobs(load_model(src), PROMPT)
    except Exception as exc:  # the fixture itself: every cell says why
        why = f"fixture: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return {f"{fmt}·vLLM": {"ok": False, "cell": "✗", "why": why} for fmt in formats}
    for fmt in formats:
        out = work / family / fmt
        t0 = time.perf_counter()
        try:
            # written for vLLM (its names and layouts), unless moedsl knows vLLM cannot load it: then as the
            # format stores it, so that vLLM's own error shows
            engine = "none" if (name, fmt) in VLLM_FAMILY_LIMITS else "vllm"
            state = quantize_with_reference(src, out, fmt, engine)
        except Exception as exc:
            row[f"{fmt}·vLLM"] = {"ok": False, "cell": "✗", "why": f"moedsl: {type(exc).__name__}: {exc}"}
            continue
        try:
            ref = load_model(src, state)
            ref_lp = logprobs(ref, PROMPT)
        except Exception as exc:  # the reference itself: the format's cells say why
            why = f"reference: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row[f"{fmt}·vLLM"] = {"ok": False, "cell": "✗", "why": why}
            continue
        quant_shift = max(abs(a - b) for a, b in zip(ref_lp, source_lp))
        v = run_probe(vllm_py, "vllm_probe.py", out, work / family / f"{fmt}-vllm", "vllm.json")
        if v.get("unused"):
            ignored = set(trivial_g_idx(out, v["unused"]))
            v["unused"] = [n for n in v["unused"] if n not in ignored]
            v["trivial_g_idx_unread"] = len(ignored)
        if v.get("unused") and name in VLLM_DROPPED:
            v["dropped_by_vllm"] = [n for n in v["unused"] if VLLM_DROPPED[name].search(n)]
            v["unused"] = [n for n in v["unused"] if n not in v["dropped_by_vllm"]]
        problem = None
        if "error" not in v:
            expected = expected_experts(ref)
            if v.get("uninitialized"):
                unread = unread_params(name, v["uninitialized"], set(expected))
                v["uninitialized"] = [n for n in v["uninitialized"] if n not in unread]
                v["unread_not_loaded"] = sorted(unread)
            problem = (compare_experts(work / family / f"{fmt}-vllm", v["experts"], expected)
                       if v.get("experts") else "vLLM holds no quantized routed experts")
        cell = verdict(v, ref_lp, VLLM_TOLERANCE, problem)
        cell["mode"] = v.get("mode")
        cell["tensors"] = v.get("tensors")
        cell["quant_shift"] = quant_shift
        if no_processor and not cell["ok"]:
            cell["why"] += f" ({no_processor})"
        said, why = VLLM_BUILD_LIMITS.get(name, (None, None))
        build_limit = why if said and re.search(said, str(v.get("error"))) else None
        row[f"{fmt}·vLLM"] = expect_limit(cell, VLLM_FAMILY_LIMITS.get((name, fmt)) or build_limit)
        if fmt == "compressed-tensors" and hf_py:
            h = run_probe(hf_py, "hf_probe.py", out, work / family / f"{fmt}-hf", "hf.json")
            limit = (FUSED_IN_TRANSFORMERS if fused_checkpoint(ref)
                     else NO_FORWARD if logits_model(ref) is not ref
                     else TRANSFORMERS_FAMILY_LIMITS.get(name))
            cell = expect_limit(verdict(h, ref_lp, HF_TOLERANCE), limit)
            if "logprobs_decompressed" in h:  # the checkpoint behind the limit (hf_probe.behind_the_hook)
                behind = verdict({"logprobs": h["logprobs_decompressed"]}, ref_lp, HF_TOLERANCE)
                cell["why"] += (f". Decompressed by compressed-tensors' own decompress_model, the sub-model's "
                                f"log-probs {'match' if behind['ok'] else 'differ'} (Δ{behind['delta']:.3f})")
                cell["decompressed"] = behind
            elif "decompressed_error" in h:
                cell["why"] += f". Decompressed by hand, it still fails: {h['decompressed_error']}"
            row[f"{fmt}·transformers"] = cell
        print(f"  {family} {fmt}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return row


def print_matrix(rows: dict[str, dict], columns: list[str]) -> str:
    lines = ["| family | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    notes = []
    for family, row in rows.items():
        cells = []
        for c in columns:
            cell = row.get(c)
            if cell is None:
                cells.append("–")
                continue
            cells.append(cell["cell"])
            if cell.get("why"):
                notes.append(f"- {family}, {c}: {cell['why']}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    text = "\n".join(lines + ([""] + notes if notes else []))
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True)
    ap.add_argument("--hf-python", default=None)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ci", action="store_true", help=f"the families CI checks: {','.join(CI_FAMILIES)}")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--work", default=None, help="keep checkpoints and probe logs here")
    ap.add_argument("--json", default=None, help="write the matrix as JSON here")
    args = ap.parse_args(argv)
    families = list(CI_FAMILIES) if args.ci else [f for f in args.families.split(",") if f]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="moedsl-serving-"))
    rows = {}
    for family in families:
        print(f"{family} ...", file=sys.stderr, flush=True)
        rows[family] = check_family(family, work, args.vllm_python, args.hf_python, args.formats.split(","))
    formats = args.formats.split(",")
    columns = [f"{f}·vLLM" for f in formats] + (
        ["compressed-tensors·transformers"] if args.hf_python and "compressed-tensors" in formats else [])
    amx = torch.cpu._is_amx_tile_supported()
    print(f"\nvLLM CPU int4 MoE kernel on this machine: {'runs (AMX)' if amx else 'cannot run (no AMX): vLLM cells check loading, tensor use and the loaded experts'}")
    print_matrix(rows, columns)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(c["ok"] for r in rows.values() for c in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
