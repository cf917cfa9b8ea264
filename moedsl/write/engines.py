"""What the serving engines load, as data beside the writers.

A run names the engine it writes for (`--engine`):
  * `auto` (the default): the names and layouts vLLM maps (gpt_oss's stacked experts), and a
    warning, before anything is quantized, for each option or family vLLM could not load;
  * `vllm`: the same, but those are refused (exit 2) before any model is loaded or quantized;
  * `none`: only what the format itself can store, no engine's names, no warnings.
`engine_problems` / `family_problems` give the reasons in vLLM's own words, and what it takes instead.

Facts are from vLLM 0.32's Python sources, which its CPU and GPU builds share (the CPU build is what
scripts/check-serving.sh runs). The refusals below are raised by vLLM's config classes on any build:
  * GPTQ (`auto_gptq.AutoGPTQConfig`): `TYPE_MAP` holds only (4, sym) and (8, sym); anything else fails
    with "Unsupported quantization config: bits=B, sym=S". `desc_act=True` with grouped weights fails
    in `gptq_utils.normalize_and_validate_gptq_desc_act`. act_order with static groups is written with
    `desc_act: false` and trivial `g_idx`, which it loads.
  * compressed-tensors (`compressed_tensors_wNa16.py`, `compressed_tensors_moe_wna16.py`): 4 and 8
    bits; actorder "group" (a g_idx) is removed, "weight" (static groups) loads. A quantized lm_head
    is a `ParallelLMHead`, not a `Linear`, so the scheme's `targets` must name it (`targets_for`).
  * GPTQ module matching (`gptq_utils.is_layer_gptq_quantized`): a runtime Linear that fuses
    checkpoint modules is quantized only if the config's `packed_modules_mapping` lists its
    parts. Several model classes (qwen2_moe, qwen3_moe with `mlp_only_layers`; deepseek_v2/v3
    with `q_lora_rank`) add `gate_up_proj` / `fused_qkv_a_proj` to that mapping only after the
    quantization config has copied it, so the dense layer comes up unquantized and loading fails
    with "'MergedColumnParallelLinear' object has no attribute 'data'". Listing the quantized
    modules in `modules_in_block_to_quantize`, the fused runtime names included
    (`gptq_module_list`), makes the match explicit.
Kernel limits differ between builds and are not refused here, since moedsl cannot know where the
checkpoint will be served: the CPU build's `CPUWNA16LinearKernel` takes output sizes that are
multiples of 32 only, and its int4 MoE kernel runs only on x86 with AMX, for SiLU experts with plain
top-k routing; a GPU build picks Marlin (its own tile sizes) or falls back to MoeWNA16 kernels. The
engine names such a limit when it loads the checkpoint (the serving check prints it verbatim).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, NamedTuple

import torch

from moedsl.errors import MoedslError
from moedsl.gptq.quantizer import QuantConfig, QuantStack

Engine = Literal["auto", "vllm", "none"]
ENGINES = ("auto", "vllm", "none")
VLLM_VERSION = "0.32"

# vLLM's fused runtime Linears and the checkpoint modules each fuses (siblings under one parent)
VLLM_FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}

VLLM_BITS = {"gptq": (4, 8), "compressed-tensors": (4, 8)}
VLLM_DESC_ACT = ("GPTQ group activation ordering (desc_act=True) is no longer supported. Use a checkpoint with "
                 "static activation ordering or desc_act=False.")


def _dynamic_act_order(cfg: QuantConfig) -> bool:
    return cfg.act_order and cfg.group_size != -1 and not cfg.static_groups


def format_problems(fmt: str, cfg: QuantConfig, *, has_experts: bool) -> list[str]:
    """What the writer itself would refuse only once the first expert is written: found up front."""
    if fmt == "compressed-tensors" and not cfg.sym and has_experts:
        return ["the compressed-tensors writer stores MoE experts symmetric only (one scheme for every expert of a "
                "layer, no expert zero points); drop --asym, or write --format gptq --engine none (gptq_v2)"]
    return []


def engine_problems(engine: str, fmt: str, cfg: QuantConfig, *, has_experts: bool = True) -> list[str]:
    """Why `engine` could not load a `fmt` checkpoint quantized with `cfg` (empty: it can)."""
    if engine == "none":
        return []
    problems = []
    if cfg.bits not in VLLM_BITS[fmt]:
        problems.append(f"vLLM {VLLM_VERSION} loads {fmt} with 4 or 8 bits only, not {cfg.bits} "
                        f"(\"Unsupported quantization config: bits={cfg.bits}, sym={cfg.sym}\")")
    if fmt == "gptq":
        if not cfg.sym:
            problems.append(f"vLLM {VLLM_VERSION} loads only symmetric GPTQ (\"Unsupported quantization config: "
                            f"bits={cfg.bits}, sym=False\"); asymmetric weights need --format compressed-tensors "
                            "(zero points, dense Linears only)")
        if _dynamic_act_order(cfg):
            problems.append(f"vLLM {VLLM_VERSION} refuses GPTQ act-order with dynamic groups (\"{VLLM_DESC_ACT}\"); "
                            "add --static-groups (same solve order, contiguous groups, loads as desc_act=false)")
    elif _dynamic_act_order(cfg):
        problems.append(f"vLLM {VLLM_VERSION} and compressed-tensors removed actorder 'group' (a g_idx); add "
                        "--static-groups (stored as actorder 'weight')")
    return problems


def gptq_checkpoint_format(cfg: QuantConfig) -> str:
    """GPTQ v1 stores zero − 1 and cannot hold a zero-point of 0, which asymmetric groups produce:
    asymmetric GPTQ (which vLLM does not load) is written as `gptq_v2`."""
    return "gptq" if cfg.sym else "gptq_v2"


# family -> {pattern on a checkpoint module name (a regular expression): what vLLM's prefix for that module
# has instead}. vLLM matches `modules_in_block_to_quantize` against the prefix it builds each Linear with (a
# substring test), which is not always the name the checkpoint (and its loader) use
VLLM_GPTQ_PREFIXES: dict[str, dict[str, str]] = {
    # vllm/.../models/granitemoehybrid.py keeps the mamba mixer as the attribute `mamba` but builds it with
    # prefix `….mixer`: matched under `mamba` only, in_proj came up unquantized and loading failed with
    # "KeyError: 'layers.0.mamba.in_proj.qweight'"
    "granitemoehybrid": {r"\.mamba\.": ".mixer."},
    # vllm/.../models/aria.py: (1) vLLM maps the list through the class's hf_to_vllm_mapper, which renames
    # `language_model.model` to `language_model`, while it builds the text model's Linears with the prefix
    # `language_model.model.…`: no name as written matched, attention came up unquantized ("'QKVParallelLinear'
    # object has no attribute 'data'"); `model.layers.…`, which the mapper leaves alone, is a substring of those
    # prefixes. (2) It builds each layer's shared experts (a LlamaMLP) with no prefix at all: their Linears'
    # prefixes are `.gate_up_proj` and `.down_proj` ("There is no module or parameter named
    # 'layers.0.mlp.shared_experts.down_proj.qweight'"); `.down_proj` is a substring of that prefix and of no
    # other Linear of Aria's (its routed experts are not Linears; its towers name theirs fc1, linear_in, ...)
    "aria": {r"^language_model\.(?=model\.layers\.)": "", r"^.*\.mlp\.shared_experts(?=\.)": ""},
}


def gptq_prefixes(engine: str, family: str | None) -> dict[str, str]:
    return {} if engine == "none" or family is None else VLLM_GPTQ_PREFIXES.get(family, {})


def gptq_module_list(quantized: list[str], prefixes: dict[str, str] | None = None) -> list[str]:
    """`modules_in_block_to_quantize` for vLLM: every quantized module by its full checkpoint name, plus
    the fused runtime name of each group of siblings vLLM fuses when all of them are quantized, plus
    each name as vLLM's prefix spells it where that differs (`prefixes`, patterns from `gptq_prefixes`)."""
    names = set(quantized)
    by_parent: dict[str, set[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(parent, set()).add(leaf)
    for parent, leaves in by_parent.items():
        for fused, parts in VLLM_FUSED_LINEARS.items():
            if set(parts) <= leaves:
                names.add(f"{parent}.{fused}" if parent else fused)
    for pattern, vllm_piece in (prefixes or {}).items():
        names |= {re.sub(pattern, vllm_piece, n) for n in names if re.search(pattern, n)}
    return sorted(names)


def targets_for(quantized: list[str]) -> list[str]:
    """compressed-tensors `targets`: every Linear, and by name the quantized heads vLLM builds as
    `ParallelLMHead` (which "Linear" does not match)."""
    heads = sorted(n for n in set(quantized) if n.rpartition(".")[2] == "lm_head")
    return ["Linear", *heads]


# ---- config.json fields vLLM reads ------------------------------------------------------------
# The output's config.json is the source's. Released checkpoints carry what vLLM reads; a config that
# transformers 5.x saved may not: its config classes drop fields that its modeling code hard-codes or
# derives, and its class names are not always the ones vLLM registers. Written where absent, for vLLM:

class Architecture(NamedTuple):
    name: str  # the class name vLLM's registry has
    fits: Callable[[dict], bool]  # whether that class can hold this config's model


# transformers' class name -> the one vLLM 0.32's registry (`_TEXT_GENERATION_MODELS`) has for the family:
# the released checkpoint's. Under transformers' name vLLM serves it with its generic Transformers backend
# (which loads it too, more slowly); renamed only where vLLM's own class can hold the model.
VLLM_ARCHITECTURES: dict[str, Architecture] = {
    # Phi-3.5-MoE's config.json; vllm/.../models/phimoe.py builds qkv_proj, o_proj and lm_head with
    # bias=True whatever the config says, as the release has them: without those biases, vLLM's class would
    # leave its own at random ("model.layers.0.self_attn.qkv_proj.bias" not loaded)
    "PhimoeForCausalLM": Architecture("PhiMoEForCausalLM",
                                      lambda c: bool(c.get("attention_bias") and c.get("lm_head_bias"))),
    # Kimi-K2.5's config.json; vllm/.../models/kimi_k25.py builds its vision tower and projector from the config.
    # Under transformers' name vLLM takes its Transformers backend, which asks transformers for the family's image
    # processor (torchvision-only in transformers 5.2x); vLLM's own class has its own (numpy, numba)
    "Kimi_K25ForConditionalGeneration": Architecture("KimiK25ForConditionalGeneration", lambda c: True),
    # baidu/Unlimited-OCR's config.json; under transformers' name vLLM has no class at all ("are not supported for
    # now"). vllm/.../models/deepseek_ocr.py builds DeepEncoder at its released sizes (SAM-ViT-B, CLIP-L) whatever
    # the config says, as every Unlimited-OCR checkpoint has them
    "UnlimitedOcrForConditionalGeneration": Architecture("UnlimitedOCRForCausalLM", lambda c: True),
}

# DeepSeek-V3's router as vLLM's deepseek_v2.py names it (see "deepseek_v3" below)
_DEEPSEEK_ROUTER: dict[str, Callable[[dict], Any]] = {"topk_method": lambda c: "noaux_tc",
                                                      "scoring_func": lambda c: "sigmoid"}

# model_type -> field -> its value from the config, as transformers' modeling uses it
VLLM_CONFIG_FIELDS: dict[str, dict[str, Callable[[dict], Any]]] = {
    # vllm/.../models/glm4_moe.py passes `config.head_dim` (no default: "'Glm4MoeConfig' object has no
    # attribute 'head_dim'"); Glm4MoeConfig has none, its attention takes hidden_size // num_attention_heads
    "glm4_moe": {"head_dim": lambda c: c["hidden_size"] // c["num_attention_heads"]},
    # vllm/.../models/deepseek_v2.py builds `gate.e_score_correction_bias` only for topk_method "noaux_tc"
    # (else "KeyError: 'layers.1.mlp.gate.e_score_correction_bias'") and scores with softmax unless
    # scoring_func says otherwise; transformers' DeepseekV3 router is always that: sigmoid scores plus the
    # correction bias. DeepSeek-V3's own config.json has both fields
    "deepseek_v3": _DEEPSEEK_ROUTER,
    # vllm/.../models/deepseek_v32 builds the same MoE (deepseek_v2.py's) under DeepSeek-V3.2 and GLM-5's sparse
    # attention; their transformers routers are DeepSeek-V3's. GLM-5's layers that reuse the previous indexer's
    # selection are transformers' `indexer_types` ("shared"), vLLM's `index_topk_pattern` ("S")
    "deepseek_v32": _DEEPSEEK_ROUTER,
    "glm_moe_dsa": {**_DEEPSEEK_ROUTER, "index_topk_pattern": lambda c: _indexer_pattern(c)},
    # vllm/.../models/glm4_moe_lite.py: dense below `config.first_k_dense_replace`, MoE above
    # ("'Glm4MoeLiteConfig' object has no attribute 'first_k_dense_replace'"); transformers says it per
    # layer (`mlp_layer_types`)
    "glm4_moe_lite": {"first_k_dense_replace": lambda c: _leading_dense(c)},
    # vllm/.../models/hy_v3.py: `first_k_dense_replace`, `expert_hidden_dim` (transformers'
    # moe_intermediate_size) and `route_norm` without defaults, `qk_norm` defaulting to False; transformers'
    # HYV3 always normalizes the top-k sigmoid weights and always has q_norm/k_norm
    "hy_v3": {"first_k_dense_replace": lambda c: _leading_dense(c),
              "expert_hidden_dim": lambda c: c.get("moe_intermediate_size"),
              "route_norm": lambda c: True, "qk_norm": lambda c: True},
    # vllm/.../models/afmoe.py reads score_func, route_norm, n_group and topk_group without defaults;
    # transformers' Afmoe router: sigmoid scores, top-k over all experts (one group), renormalized
    "afmoe": {"score_func": lambda c: "sigmoid", "route_norm": lambda c: True, "n_group": lambda c: 1,
              "topk_group": lambda c: 1},
    # vllm/.../models/minimax_m2.py reads scoring_func and rotary_dim without defaults and builds
    # `e_score_correction_bias` only for use_routing_bias; transformers' MiniMaxM2 router: sigmoid plus the
    # correction bias, rotary width head_dim · partial_rotary_factor (MiniMax-M2's config.json has all three)
    "minimax_m2": {"scoring_func": lambda c: "sigmoid", "use_routing_bias": lambda c: True,
                   "rotary_dim": lambda c: _rotary_dim(c)},
    # vllm/.../models/mimo_v2.py reads MiMo-V2-Flash's released field names, which transformers' MiMoV2FlashConfig
    # folds into its own: the sliding layers (`hybrid_layer_pattern`, 1 = sliding) and the MoE ones
    # (`moe_layer_freq`, one flag per layer), `layernorm_epsilon`, and the sliding layers' attention under `swa_*`
    # (transformers doubles their kv heads, keeps the heads and head dims, and gives them sinks:
    # `add_swa_attention_sink_bias`, else vLLM has no parameter for them). Their window is `sliding_window_size`,
    # transformers' sliding_window less the query (its config adds it back on load); the rope bases are flat
    # (`rope_theta`, `swa_rope_theta`, `partial_rotary_factor`), transformers nests them per layer type
    "mimo_v2_flash": {"hybrid_layer_pattern": lambda c: _layer_flags(c.get("layer_types"), "sliding_attention"),
                      "moe_layer_freq": lambda c: _layer_flags(c.get("mlp_layer_types"), "sparse"),
                      "layernorm_epsilon": lambda c: c.get("rms_norm_eps"),
                      "swa_num_attention_heads": lambda c: c.get("num_attention_heads"),
                      "swa_num_key_value_heads": lambda c: 2 * c["num_key_value_heads"],
                      "swa_head_dim": lambda c: c.get("head_dim"),
                      "swa_v_head_dim": lambda c: c.get("v_head_dim"),
                      "sliding_window_size": lambda c: c["sliding_window"] - 1 if c.get("sliding_window") else None,
                      "add_swa_attention_sink_bias": lambda c: True,
                      "rope_theta": lambda c: _rope(c, "full_attention", "rope_theta"),
                      "swa_rope_theta": lambda c: _rope(c, "sliding_attention", "rope_theta"),
                      "partial_rotary_factor": lambda c: _rope(c, "full_attention", "partial_rotary_factor")},
    # vllm/.../models/kimi_k3 (its KimiLinearForCausalLM) and its KimiLinearConfig read the released fields:
    # the KDA layers, 1-based, with their heads and short-convolution width under `linear_attn_config` (without it
    # every layer is built as MLA), `first_k_dense_replace` (default 0: layer 0 would be MoE), and `mla_use_nope`
    # ("Kimi-K3 MLA (MultiHeadLatentAttention) is NoPE-only"): transformers' KimiLinear MLA applies no rotary
    "kimi_linear": {"linear_attn_config": lambda c: _kda_layers(c),
                    "first_k_dense_replace": lambda c: _leading_dense(c), "mla_use_nope": lambda c: True},
    # vllm/.../models/longcat_flash.py reads the released `mla_scale_q_lora` / `mla_scale_kv_lora` (whether to scale
    # q and kv by sqrt(hidden / lora rank): transformers' LongcatFlash attention always does) and `zero_expert_type`
    # (transformers' zero experts pass the token through: vLLM's "identity")
    "longcat_flash": {"mla_scale_q_lora": lambda c: True, "mla_scale_kv_lora": lambda c: True,
                      "zero_expert_type": lambda c: "identity"},
}


def _indexer_pattern(config: dict) -> str | None:
    """transformers' per-layer `indexer_types` ("full" / "shared") as vLLM's `index_topk_pattern` ("F" / "S")."""
    types = config.get("indexer_types")
    return "".join("S" if t == "shared" else "F" for t in types) if types else None


def _kda_layers(config: dict) -> dict | None:
    """transformers' per-layer `layer_types` and linear-attention widths as Kimi-Linear's `linear_attn_config`."""
    types = config.get("layer_types")
    if not types:
        return None
    return {"kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
            "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
            "head_dim": config.get("linear_head_dim"), "num_heads": config.get("linear_num_heads"),
            "short_conv_kernel_size": config.get("linear_conv_kernel_dim")}


def _layer_flags(types: list[str] | None, kind: str) -> list[int] | None:
    """A per-layer type list as vLLM's per-layer flags (1 where the layer is `kind`)."""
    return [int(t == kind) for t in types] if types else None


def _rope(config: dict, layer_type: str, key: str):
    """One value of transformers' per-layer-type rope parameters (None where the config is not nested so)."""
    return ((config.get("rope_parameters") or {}).get(layer_type) or {}).get(key)


def _leading_dense(config: dict) -> int | None:
    """`mlp_layer_types` as one count of leading dense layers (None where it is not that shape)."""
    types = config.get("mlp_layer_types")
    if not types:
        return None
    k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    return k if all(t == "sparse" for t in types[k:]) else None


def _rotary_dim(config: dict) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(head_dim * (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))


def _unlimited_ocr_layout(config: dict) -> dict:
    """vllm/transformers_utils/configs/unlimited_ocr.py (DeepSeek-VL2's config) builds the text model from
    `language_config`, a DeepSeek-V2 config, as baidu/Unlimited-OCR's config.json has it, with `sliding_window` on
    the top level; from transformers' `text_config` it gets a dict, not a config ("The text_config extracted from
    the model config does not have `num_attention_heads` attribute"). transformers' UnlimitedOcrConfig reads this
    layout back (its `language_config` compatibility). DeepSeek-V2's fields for plain multi-head attention
    (vllm/.../models/deepseek_v2.py takes MHA where qk_nope_head_dim and qk_rope_head_dim are 0, MLA where
    kv_lora_rank is set) and its dense layers as one count (`first_k_dense_replace`); transformers' per-layer
    `layer_types` and `mlp_layer_types` are left out: the transformers vLLM pins refuses
    "reference_sliding_attention" (the layers' types follow from `sliding_window` and `first_k_dense_replace`)."""
    text = {k: v for k, v in config["text_config"].items() if k not in ("layer_types", "mlp_layer_types")}
    dense = _leading_dense(config["text_config"])
    language = {**text, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "kv_lora_rank": None, "q_lora_rank": None,
                **({"first_k_dense_replace": dense} if dense is not None else {})}
    out = {k: v for k, v in config.items() if k != "text_config"}
    sliding = language.pop("sliding_window", None)
    return {**out, "language_config": language, **({"sliding_window": sliding} if sliding is not None else {})}


# model_type -> the config as the family's release lays it out, from the one transformers 5.x saves (a composite's
# `text_config`), where vLLM reads only the release's
VLLM_CONFIG_LAYOUTS: dict[str, Callable[[dict], dict]] = {
    "unlimited_ocr": _unlimited_ocr_layout,
}


def _missing_fields(config: dict) -> dict:
    fields = VLLM_CONFIG_FIELDS.get(config.get("model_type"), {})
    values = {k: f(config) for k, f in fields.items() if config.get(k) is None}
    return {k: v for k, v in values.items() if v is not None}  # None: not derivable, vLLM says what it lacks


def engine_config(engine: str, config: dict) -> tuple[dict, list[str]]:
    """`config` (a config.json) with what `engine` reads and it lacks; and what was added, in words.
    A composite's `text_config` is completed by its own model_type."""
    if engine == "none":
        return config, []
    out = dict(config)
    added = []
    archs = out.get("architectures") or []
    renamed = [VLLM_ARCHITECTURES[a].name if a in VLLM_ARCHITECTURES and VLLM_ARCHITECTURES[a].fits(out) else a
               for a in archs]
    if renamed != archs:
        out["architectures"] = renamed
        added.append(f"architectures {archs} -> {out['architectures']} (the name vLLM {VLLM_VERSION} registers)")
    layout = VLLM_CONFIG_LAYOUTS.get(out.get("model_type"))
    if layout is not None and isinstance(out.get("text_config"), dict):
        out = layout(out)
        added.append(f"text_config as `language_config` (the layout of {out['model_type']}'s release, which vLLM "
                     f"{VLLM_VERSION} reads)")
    missing = _missing_fields(out)
    out.update(missing)
    added += [f"{k} = {v!r}" for k, v in missing.items()]
    text = out.get("text_config")
    if isinstance(text, dict) and (missing := _missing_fields(text)):
        out["text_config"] = {**text, **missing}
        added += [f"text_config.{k} = {v!r}" for k, v in missing.items()]
    return out, added


# ---- per-family expert names and layouts ------------------------------------------------------

class StackedExperts(NamedTuple):
    """vLLM maps this family's quantized experts only as one gate+up matrix per expert.

    Keys are `<layer>.<template with {e}><join><local>` (`mlp.experts.3.w13_weight_packed`,
    `mlp.experts.3.gate_up_proj.weight_packed`); `order` is how gate and up rows are combined (gpt-oss's SwiGLU
    reads them interleaved: even rows gate)."""

    w13: str
    w2: str
    order: Literal["interleave", "concat"]
    omit: tuple[str, ...]  # local keys its loader has no name for (and never reads)
    join: str = "_"


# family (definition name) -> format -> the stacked names vLLM's loader maps
VLLM_STACKED_EXPERTS: dict[str, dict[str, StackedExperts]] = {
    # vllm/model_executor/models/gpt_oss.py `_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD`: per expert
    # `experts.<e>.{w13,w2}_{weight_packed,weight_scale,bias}`; weight_shape has no name there
    "gpt_oss": {"compressed-tensors": StackedExperts("mlp.experts.{e}.w13", "mlp.experts.{e}.w2", "interleave",
                                                     ("weight_shape",))},
    # vllm/model_executor/models/aria.py loads through LlamaModel.load_weights, whose stacked-parameter mapping
    # renames a per-expert `experts.<e>.gate_proj.*` to `experts.<e>.gate_up_proj.*` before the expert mapping
    # sees it; the experts' loader then takes it for a per-expert gate+up matrix and loads half of it into each of
    # w1 and w3 (the rest stays at its init, the scales at 1: "vLLM's experts differ from the quantized ones (max
    # rel. 75.5)" in the serving check). Written as that matrix, gate rows then up rows, it loads whole
    "aria": {"compressed-tensors": StackedExperts("mlp.experts.{e}.gate_up_proj", "mlp.experts.{e}.down_proj",
                                                  "concat", (), ".")},
}

# (family, format) -> why vLLM cannot load that family's quantized experts in that format
VLLM_FAMILY_LIMITS: dict[tuple[str, str], str] = {
    ("gpt_oss", "gptq"): "vLLM's gpt_oss loader maps int4 experts only as compressed-tensors "
                         "(`experts.<e>.w13_weight_packed`, ...) or MXFP4; GPTQ expert tensors (`qweight`, ...) are "
                         "skipped without a word and the experts stay unloaded; use --format compressed-tensors",
    ("dbrx", "gptq"): "vLLM's DbrxExperts.weight_loader copies only unquantized or FP8 expert weights; it has no "
                      "mapping for int4 experts (loading fails with KeyError on the first expert tensor)",
    ("dbrx", "compressed-tensors"): "vLLM's DbrxExperts.weight_loader copies only unquantized or FP8 expert weights; "
                                    "it has no mapping for int4 experts (loading fails with KeyError on the first "
                                    "expert tensor)",
    # vllm/.../layers/mamba/mamba_mixer.py (jamba's mixer) builds in_proj, x_proj, dt_proj and out_proj with no
    # quant_config; and JambaForCausalLM keeps no `quant_config`, so its loader does not drop GPTQ's g_idx
    ("jamba", "gptq"): "vLLM's jamba mamba mixer builds its projections unquantized (no quant_config), so quantized "
                       "mamba.in_proj/out_proj cannot load; and its loader, which keeps no quant_config, does not drop "
                       "GPTQ's g_idx (loading fails on the first one)",
    ("jamba", "compressed-tensors"): "vLLM's jamba mamba mixer builds its projections unquantized (no quant_config), so "
                                     "quantized mamba.in_proj/out_proj cannot load (loading fails on the first "
                                     "weight_packed)",
    # vllm/.../models/laguna.py: its comment says the checkpoint's `mlp.experts.e_score_correction_bias` (the released
    # name, the one transformers saves) is picked up by the MoE runner, but the parameter sits at
    # `mlp.experts.routed_experts.e_score_correction_bias`: the tensor is never read, the bias stays at its zero init
    # (bf16 checkpoints too), and routing differs from the model's
    ("laguna", "gptq"): "vLLM's laguna loader leaves the router's e_score_correction_bias unloaded (the checkpoint's "
                        "`mlp.experts.e_score_correction_bias` is never read; `mlp.experts.routed_experts."
                        "e_score_correction_bias` stays zero), for any checkpoint, so routing differs from the model's",
    ("laguna", "compressed-tensors"): "vLLM's laguna loader leaves the router's e_score_correction_bias unloaded (the "
                                      "checkpoint's `mlp.experts.e_score_correction_bias` is never read; "
                                      "`mlp.experts.routed_experts.e_score_correction_bias` stays zero), for any "
                                      "checkpoint, so routing differs from the model's",
}


# family -> why transformers (5.24) + compressed-tensors cannot load its compressed-tensors checkpoints as written
# for vLLM (the serving check expects these to fail, and reports a limit that stops failing)
TRANSFORMERS_FAMILY_LIMITS: dict[str, str] = {
    # transformers/quantizers/base.py `update_weight_conversions` gives every converter of the model's conversion
    # mapping a dequantize step when the target has no quantized companions, even where nothing was quantized;
    # CompressedTensorsDequantize (integrations/compressed_tensors.py) passes on only `weight_packed` tensors
    "kimi_linear": "transformers makes each converter of the model's conversion mapping dequantize its sources, also "
                   "those over tensors that were never quantized: kimi_linear's concatenation of the full-precision "
                   "q_conv1d/k_conv1d/v_conv1d into conv1d receives nothing (\"Concatenate on tensors destined for "
                   "model.layers.0.self_attn.conv1d.weight. Ckpt contains: 0\") and loading fails (\"We encountered "
                   "some issues during automatic conversion of the weights\"), for any compressed-tensors checkpoint",
    # transformers/models/longcat_flash: LongcatFlashExperts allocates n_routed_experts + zero_expert_num rows
    "longcat_flash": "transformers' LongcatFlash experts hold rows for the zero experts too (n_routed_experts + "
                     "zero_expert_num), so it loads only checkpoints that store weights for those weightless slots; "
                     "vLLM refuses them (writes_weightless_slots), and without them transformers fails (\"Reinit due "
                     "to size mismatch - ckpt: torch.Size([8, 128, 128]) vs model:torch.Size([10, 128, 128])\"), "
                     "bf16 checkpoints alike",
    # transformers/conversion_mapping.py: ernie4_5_vl_moe's ErnieFuseAndSplitTextVisionExperts collects
    # `experts.*.{gate,up,down}_proj.weight` only
    "ernie4_5_vl_moe": "transformers' converter for Ernie-4.5-VL's experts (ErnieFuseAndSplitTextVisionExperts, which "
                       "fuses the per-expert tensors and splits them into text and vision experts) collects only "
                       "`.weight` tensors, so quantized experts (`weight_packed`) reach it as nothing (\"Expected "
                       "pattern experts.*.down_proj.weight in collected tensors but only found tensors for: "
                       "dict_keys(['experts.*.down_proj.weight_packed'])\") and loading fails",
}


def family_problems(engine: str, family: str, fmt: str) -> list[str]:
    """Why `engine` could not load this family's quantized experts in `fmt` (empty: it can)."""
    if engine == "none":
        return []
    why = VLLM_FAMILY_LIMITS.get((family, fmt))
    return [f"vLLM {VLLM_VERSION}, {family}: {why}"] if why else []


def stacked_experts(engine: str, family: str, fmt: str) -> StackedExperts | None:
    """The stacked expert names this family's experts are written under (None: per expert, as transformers
    names them)."""
    if engine == "none":
        return None
    return VLLM_STACKED_EXPERTS.get(family, {}).get(fmt)


def writes_weightless_slots(engine: str) -> bool:
    """Whether the tensors a source stores for the weightless `extra identity/zero` router slots are copied
    (no forward reads them: transformers' save_pretrained writes LongCat's zero experts because its fused
    experts hold rows for them). vLLM maps experts 0..E-1 only and fails on the first such tensor
    ("KeyError: 'layers.0.mlp.experts.8.gate_proj.weight'", vllm/.../models/longcat_flash.py)."""
    return engine == "none"


def stack_gate_up(gate: QuantStack, up: QuantStack, order: str) -> QuantStack:
    """Each expert's gate and up rows as one matrix (stacks [n, out, …] → [n, 2·out, …]): interleaved
    (g0 u0 g1 u1 …) or gate then up. Both read the expert's input, so their g_idx must agree."""
    if not torch.equal(gate.g_idx, up.g_idx):
        raise MoedslError("cannot stack gate and up: their g_idx differ (they did not share a Hessian)", code="write")

    def rows(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None:
            return None
        if order == "interleave":
            return torch.stack([a, b], dim=2).flatten(1, 2)
        return torch.cat([a, b], dim=1)

    return QuantStack(codes=rows(gate.codes, up.codes), scales=rows(gate.scales, up.scales),
                      zeros=rows(gate.zeros, up.zeros), g_idx=gate.g_idx, bias=rows(gate.bias, up.bias))
