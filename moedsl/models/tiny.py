"""Tiny, real models built from transformers' own configs.

moedsl never downloads weights. To exercise a family it takes the family's default config
(`AutoConfig.for_model(model_type)`), shrinks every size to a few dozen (hidden 64, 8 experts,
top-2, head_dim 16, ...), keeps enough layers that every *layer kind* of the family is present
(dense and MoE MLPs, linear and full attention, mamba and attention, ...), and instantiates it
with `AutoModelForCausalLM.from_config`: on the meta device for structure, or on CPU with small
deterministic random weights for numerics. `save_tiny` writes a real checkpoint
(`save_pretrained`, safetensors, on-disk names as the family's checkpoints spell them) plus a
byte-level tokenizer, so the load-from-disk paths are tested too.

Sizes are chosen so shapes cannot be confused: hidden 64, dense intermediate 96, routed-expert
intermediate 32, shared-expert intermediate 48, head_dim 16, vocab 320.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moedsl.errors import MoedslError

__all__ = [
    "TINY_HIDDEN",
    "TINY_VOCAB",
    "TINY_NUM_EXPERTS",
    "TINY_TOP_K",
    "MOE_TINY",
    "MOE_EXTRA_TINY",
    "COMPOSITE_TINY",
    "DENSE_TINY",
    "TINY_NOTES",
    "SUPPORTED_TINY",
    "UNSUPPORTED_TINY",
    "available_tiny",
    "tiny_config",
    "shrink_like",
    "build_model",
    "model_class",
    "save_tiny",
    "save_processor",
    "layer_kind_lists",
]

TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_HEAD_DIM = 16
TINY_INTERMEDIATE = 96  # dense MLPs, and experts of families whose experts use `intermediate_size`
TINY_MOE_INTERMEDIATE = 32  # routed experts where the config has a separate expert width
TINY_SHARED_INTERMEDIATE = 48  # shared experts where the config has a separate width
TINY_NUM_EXPERTS = 8
TINY_TOP_K = 2
TINY_VOCAB = 320  # >= the byte tokenizer's 259 ids
TINY_MAX_POS = 256
TINY_SLIDING_WINDOW = 8  # small enough that a 16-token test sequence really slides


# ---------------------------------------------------------------------------------------------
# Which families work. Every entry of SUPPORTED_TINY builds on meta and CPU, runs a forward and
# survives save_pretrained -> from_pretrained on transformers 5.24 (CPU, torch 2.13). Types that
# the installed transformers does not know are skipped by `available_tiny()`.
# ---------------------------------------------------------------------------------------------

MOE_TINY: tuple[str, ...] = (
    # the families of shared/reference/transformers-moe.md
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe_text",
    "mixtral",
    "minimax",
    "minimax_m2",
    "phimoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "glm4_moe_lite",
    "dots1",
    "ernie4_5_moe",
    "gpt_oss",
    "dbrx",
    "llama4_text",
    "granitemoe",
    "olmoe",
    "flex_olmo",
    "jamba",
    "hunyuan_v1_moe",
    "longcat_flash",
)

# Further MoE families of transformers 5.2x (built the same way; several exist only in >= 5.18).
MOE_EXTRA_TINY: tuple[str, ...] = (
    "afmoe",
    "aria_text",
    "axk1",
    "axk2",
    "bailing_hybrid",
    "beam",
    "cohere2_moe",
    "deepseek_v32",
    "deepseek_v4",
    "doge",
    "dots3_note_text",
    "exaone_moe",
    "flint",
    "gemma4_text",
    "glm_moe_dsa",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
    "hy_v3",
    "hy_v4",
    "inkling2_loop_text",
    "inkling2_text",
    "inkling_text",
    "jetmoe",
    "kimi_linear",
    "kolibri1",
    "laguna",
    "lara_mini",
    "lfm2_moe",
    "mellum",
    "mimo_v2_flash",
    "minimax_m3_vl_text",
    "nemotron_h",
    "qwen4_exp_text",
    "sarvam_mla",
    "sarvam_moe",
    "solar_open",
    "zaya",
)

DENSE_TINY: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
    "olmo2",
)

# Caveats of supported families (they build, run and round-trip, but read this first).
TINY_NOTES: dict[str, str] = {
    "inkling2_text": "layer kinds tied to attention-residual index ranges are not all present in the tiny layers",
    "inkling2_loop_text": "loop layers (loop_layer_index_start/end) are not reproduced in the tiny layer count",
    "dots3_note_text": "per_layer_config (full-size per-layer attention widths) is dropped",
    "jetmoe": "experts are ParallelExperts (not the fused gate_up_proj/down_proj layout)",
    "llama4_text": "layers 1 and 3 are MoE (moe_layers=[1, 3]); the default config has MoE everywhere",
    "granitemoeshared": "has a shared MLP (shared_intermediate_size 48); the default config has none",
    "inkling_text": "router has E+1 outputs (a sink expert); routers keep the model's own init",
    "zaya": "top-1 routing (the family supports only num_experts_per_tok=1); its router MLP keeps the model's own init",
    "qwen3_omni_moe": "thinker only (enable_audio_output=False): transformers' default talker config does not build",
}

# MoE families that `tiny_config`/`build_model` cannot cover, with the reason. Multimodal MoE
# models keep their MoE text model under a composite config with no AutoModelForCausalLM entry
# for the text part; moedsl's tiny models are text-only causal LMs.
UNSUPPORTED_TINY: dict[str, str] = {
    "qwen3_vl_moe_text": "text part of a multimodal model: no AutoModelForCausalLM mapping",
    "glm4v_moe_text": "text part of a multimodal model: no AutoModelForCausalLM mapping",
    "ernie4_5_vl_moe_text": "text part of a multimodal model: no AutoModelForCausalLM mapping",
    "qwen3_omni_moe_text": "text part of a multimodal model: no AutoModelForCausalLM mapping",
    "nllb-moe": "encoder-decoder translation model, not a causal LM",
}

# Composite (vision-language, omni) MoE models: a `…ForConditionalGeneration` whose text decoder is one
# part of the model. Every sub-config is shrunk (text, vision, audio); the model is built with the
# class transformers maps the model_type to (`model_class`).
COMPOSITE_TINY: tuple[str, ...] = (
    "glm4v_moe",
    "ernie4_5_vl_moe",
    "qwen3_omni_moe",
    "llama4",
    "qwen3_vl_moe",
    "aria",
    "qwen3_5_moe",
    "kimi_k25",
    "qwen3_omni_moe_thinker",
    "unlimited_ocr",
    "mistral_large4",
)
# composite sub-configs that are not text decoders: shrunk with these keys (where the config has them)
_TOWER: dict[str, Any] = {
    "depth": 2, "num_hidden_layers": 2, "encoder_layers": 2, "hidden_size": 32, "d_model": 32,
    "num_heads": 2, "num_attention_heads": 2, "encoder_attention_heads": 2, "intermediate_size": 64,
    "encoder_ffn_dim": 64, "out_hidden_size": 64, "output_dim": 64, "vision_output_dim": 64,
    "projector_input_dim": 64, "projector_output_dim": 64, "downsample_hidden_size": 16, "num_mel_bins": 16,
    "n_window": 4, "n_window_infer": 8,
}
# the (t, h, w) rotary sections a text model uses when its config names none (ernie needs h == w)
_MROPE_DEFAULT: dict[str, list[int]] = {"ernie4_5_vl_moe_text": [22, 22, 20]}
_COMPOSITE_FAMILY: dict[str, dict] = {
    # the talker of transformers' default config does not build (its text config lacks
    # shared_expert_intermediate_size); real Thinking checkpoints have no talker either
    "qwen3_omni_moe": {"enable_audio_output": False},
}
# composite keys that must follow a shrunk sub-config's width, as they do in the releases: model_type -> key ->
# its value from the composite's keyword arguments (unless overridden). Kimi-K2.5's projector norm is
# `projection_hidden_size` wide in transformers and vision_config.hidden_size wide in vLLM (1152 both in the release)
_COMPOSITE_TIED: dict[str, dict[str, Callable[[dict], Any]]] = {
    "kimi_k25": {"projection_hidden_size": lambda kw: kw["vision_config"]["hidden_size"]},
}

SUPPORTED_TINY: tuple[str, ...] = MOE_TINY + MOE_EXTRA_TINY + DENSE_TINY  # causal LMs; composites are separate


def available_tiny(types: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The entries of `types` (default SUPPORTED_TINY) that the installed transformers knows."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return tuple(t for t in (types or SUPPORTED_TINY) if t in CONFIG_MAPPING_NAMES)


# ---------------------------------------------------------------------------------------------
# Shrinking
# ---------------------------------------------------------------------------------------------

# Keys set whenever the family's config has them (even when its default is None: dots1 ships
# `n_routed_experts=None`). Value may be a callable of the number of layers.
_ALWAYS: dict[str, Any] = {
    # widths
    "hidden_size": TINY_HIDDEN,
    "d_model": TINY_HIDDEN,
    "intermediate_size": TINY_INTERMEDIATE,
    "ffn_hidden_size": TINY_INTERMEDIATE,
    "intermediate_size_mlp": TINY_INTERMEDIATE,
    "dense_intermediate_size": TINY_INTERMEDIATE,
    "moe_intermediate_size": TINY_MOE_INTERMEDIATE,
    "expert_ffn_hidden_size": TINY_MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": TINY_SHARED_INTERMEDIATE,
    "shared_experts_intermediate_size": TINY_SHARED_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": TINY_SHARED_INTERMEDIATE,
    # attention
    "num_attention_heads": TINY_HEADS,
    "n_heads": TINY_HEADS,
    "num_key_value_heads": TINY_KV_HEADS,
    "head_dim": TINY_HEAD_DIM,
    "kv_channels": TINY_HEAD_DIM,
    # vocabulary and positions
    "vocab_size": TINY_VOCAB,
    "max_position_embeddings": TINY_MAX_POS,
    "max_seq_len": TINY_MAX_POS,
    "model_max_length": TINY_MAX_POS,
    # experts: every spelling
    "num_experts": TINY_NUM_EXPERTS,
    "num_local_experts": TINY_NUM_EXPERTS,
    "n_routed_experts": TINY_NUM_EXPERTS,
    "moe_num_experts": TINY_NUM_EXPERTS,
    "num_experts_per_tok": TINY_TOP_K,
    "num_experts_per_token": TINY_TOP_K,
    "moe_k": TINY_TOP_K,
    "moe_topk": TINY_TOP_K,
    "top_k_experts": TINY_TOP_K,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    # MLA (deepseek, glm4_moe_lite, longcat, ...)
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    # linear attention (qwen3_next, qwen3_5_moe, kimi, bailing, ...)
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    # mamba (jamba, granitemoehybrid, nemotron_h)
    "mamba_d_state": 8,
    "mamba_dt_rank": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "mamba_chunk_size": 16,
    "ssm_state_size": 8,
    "chunk_size": 16,
    "use_mamba_kernels": False,
    # sparse-attention indexers (deepseek_v32, glm_moe_dsa, ...)
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 8,
    # newer families' extra attention widths
    "swa_head_dim": TINY_HEAD_DIM,
    "swa_num_attention_heads": TINY_HEADS,
    "swa_num_key_value_heads": TINY_KV_HEADS,
    "o_lora_rank": 32,
    "o_groups": 2,
    "vocab_size_per_layer_input": TINY_VOCAB,
    "unpadded_vocab_size": TINY_VOCAB,
    # misc
    "zero_expert_num": 2,
    "router_hidden_size": 32,
    "max_window_layers": lambda n: n,
}

# Keys set only when the family's default is not None (None means "feature off" there).
_IF_SET: dict[str, Any] = {
    "q_lora_rank": 48,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "sliding_window": TINY_SLIDING_WINDOW,
    "attention_chunk_size": TINY_SLIDING_WINDOW,
    "sliding_window_size": TINY_SLIDING_WINDOW,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "shared_intermediate_size": TINY_SHARED_INTERMEDIATE,
    "original_max_position_embeddings": TINY_MAX_POS,
    "query_pre_attn_scalar": TINY_HEAD_DIM,
    "hidden_size_per_layer_input": 16,
}

# Per family: number of layers and extra overrides (a dict, or a callable taking the default
# config's dict and returning one). Values here win over the generic ones above.
_FAMILY: dict[str, tuple[int, Any]] = {
    # dense layer 0 via mlp_only_layers; sparse step 1
    "qwen2_moe": (2, {"mlp_only_layers": [0], "decoder_sparse_step": 1}),
    "qwen3_moe": (2, {"mlp_only_layers": [0], "decoder_sparse_step": 1}),
    # hybrid: 3 linear_attn + 1 self_attn (full_attention_interval 4); layer 0 dense
    "qwen3_next": (4, {"mlp_only_layers": [0], "decoder_sparse_step": 1}),
    "qwen3_5_moe_text": (4, {}),
    "minimax": (2, {"block_size": 4}),
    "deepseek_v2": (2, {"first_k_dense_replace": 1, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
    "deepseek_v3": (2, {"first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}),
    "glm4_moe": (2, {"first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}),
    "glm4_moe_lite": (2, {"mlp_layer_types": ["dense", "sparse"], "n_group": 2, "topk_group": 1}),
    "dots1": (2, {"first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}),
    "ernie4_5_moe": (2, {"moe_layer_start_index": 1, "moe_layer_end_index": 1, "moe_layer_interval": 1}),
    "llama4_text": (4, {"moe_layers": [1, 3], "interleave_moe_layer_step": 2, "no_rope_layer_interval": 4}),
    # jamba: 0 mamba+dense, 1 mamba+moe, 2 attn+dense, 3 mamba+moe (the real model has no attn+moe layer)
    "jamba": (
        4,
        {"attn_layer_period": 4, "attn_layer_offset": 2, "expert_layer_period": 2, "expert_layer_offset": 1},
    ),
    "longcat_flash": (2, {"num_layers": 2}),
    "hunyuan_v1_moe": (2, {"head_dim": TINY_HEAD_DIM}),
    "dbrx": (2, None),  # sub-configs: see _dbrx_overrides
    # further MoE families of transformers 5.2x (not in the reference table)
    "granitemoehybrid": (2, {"layer_types": ["linear_attention", "attention"]}),
    "lfm2_moe": (4, {"layer_types": ["conv", "conv", "full_attention", "conv"], "num_dense_layers": 1}),
    "zaya": (2, {"num_experts_per_tok": 1}),  # ZAYA supports top-1 only
    "qwen4_exp_text": (
        2,
        {"indexer_budget": 8, "indexer_compress_ratio": 2, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16},
    ),
    "dots3_note_text": (2, {"per_layer_config": {}, "head_dim": 24}),  # per-layer overrides are full-size
}

_TOKEN_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}


def _dbrx_overrides(d: dict) -> dict:
    return {
        "d_model": TINY_HIDDEN,
        "n_heads": TINY_HEADS,
        "n_layers": 2,
        "max_seq_len": TINY_MAX_POS,
        "vocab_size": TINY_VOCAB,
        # rope_theta: DbrxAttention reads attn_config.rope_theta, which the config class lacks
        # (real DBRX config.json files carry it); clip_qkv=None crashes DbrxAttention.forward
        "attn_config": {
            "kv_n_heads": TINY_KV_HEADS,
            "clip_qkv": 8.0,
            "rope_theta": float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        },
        "ffn_config": {
            "ffn_hidden_size": TINY_INTERMEDIATE,
            "moe_num_experts": TINY_NUM_EXPERTS,
            "moe_top_k": TINY_TOP_K,
            "hidden_size": TINY_HIDDEN,
        },
    }


def _layer_count_key(d: dict) -> str:
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if key in d:
            return key
    return "num_hidden_layers"


def _shrink(model_type: str, d: dict, attribute_map: dict) -> dict:
    """Overrides (kwargs for `AutoConfig.for_model`) that shrink the default config `d`."""
    n_layers, family = _FAMILY.get(model_type, (2, {}))
    if model_type == "dbrx":
        return _dbrx_overrides(d)
    kw: dict[str, Any] = {}

    def settable(key: str) -> bool:
        return key in d and key not in attribute_map

    for key, value in _ALWAYS.items():
        if settable(key):
            kw[key] = value(n_layers) if callable(value) else value
    for key, value in _IF_SET.items():
        if settable(key) and d[key] is not None:
            kw[key] = value(n_layers) if callable(value) else value
    kw[_layer_count_key(d)] = n_layers

    # MLA families: head_dim means the rope part; qk_head_dim is derived.
    if settable("kv_lora_rank"):
        if settable("head_dim"):
            kw["head_dim"] = kw.get("qk_rope_head_dim", 8)
        if settable("qk_head_dim"):
            kw["qk_head_dim"] = kw.get("qk_nope_head_dim", 16) + kw.get("qk_rope_head_dim", 8)
    # many MLA configs default num_key_value_heads to num_attention_heads; keep them equal there
    if settable("kv_lora_rank") and settable("num_key_value_heads"):
        kw["num_key_value_heads"] = TINY_HEADS
    # token ids inside the tiny vocabulary
    for key, value in _TOKEN_IDS.items():
        if key in d and d[key] is not None:
            kw[key] = value
    for key in ("eod_token_id", "sep_token_id"):
        if key in d and d[key] is not None:
            kw[key] = 259 + ("eod_token_id", "sep_token_id").index(key)
    if d.get("tie_word_embeddings") is None and "tie_word_embeddings" in d:
        kw["tie_word_embeddings"] = False
    # per-layer index lists that refer to the old layer count
    if settable("moe_layer_end_index"):
        kw["moe_layer_end_index"] = n_layers - 1
    if settable("mlp_only_layers") and d.get("mlp_only_layers"):
        kw["mlp_only_layers"] = [0]  # keep one dense layer, not all of them

    fam = family(d) if callable(family) else dict(family or {})
    kw.update({attribute_map.get(k, k): v for k, v in fam.items()})
    return kw


def layer_kind_lists(config) -> dict[str, list]:
    """The per-layer lists of a config (`layer_types`, `mlp_layer_types`, ...): attribute name -> list.

    A list attribute counts as per-layer when its length equals the number of layers.
    """
    d = config.to_dict()
    n = d.get(_layer_count_key(d))
    return {
        k: v
        for k, v in d.items()
        if isinstance(v, list) and n is not None and len(v) == n and k not in ("architectures",)
    }


_MAX_TINY_LAYERS = 6


def _is_kind_list(values: list) -> bool:
    """A per-layer list of *kinds* (strings, bools, 0/1 flags), not of sizes."""
    return all(isinstance(v, (str, bool)) or (isinstance(v, int) and v in (0, 1)) for v in values)


def _fix_layer_kinds(
    model_type: str, base_lists: dict[str, list], tiny_lists: dict[str, list], cfg_kwargs: dict, n_layers: int
) -> dict:
    """Per-layer kind lists of the shrunk config must still contain every combination of kinds of
    the full one (e.g. (linear_attention, dense), (full_attention, sparse), ...).

    When the shrunk config lost a combination, pick from the full config the first layer of each
    combination (in layer order), pad with the following layers to `n_layers`, and pass those
    lists explicitly. Lists that the family overrides set are left alone.
    """
    keys = [k for k, v in base_lists.items() if k not in cfg_kwargs and _is_kind_list(v)]
    if not keys:
        return {}
    n_base = len(base_lists[keys[0]])
    combos_base = [tuple(base_lists[k][i] for k in keys) for i in range(n_base)]
    if all(k in tiny_lists for k in keys):
        n_tiny = len(tiny_lists[keys[0]])
        combos_tiny = {tuple(tiny_lists[k][i] for k in keys) for i in range(n_tiny)}
        if set(combos_base) <= combos_tiny:
            return {}
    first: dict[tuple, int] = {}
    for i, combo in enumerate(combos_base):
        first.setdefault(combo, i)
    picked = sorted(first.values())
    if len(picked) > _MAX_TINY_LAYERS:
        raise MoedslError(
            f"{model_type}: the per-layer lists {keys} have {len(picked)} combinations of kinds, "
            f"more than {_MAX_TINY_LAYERS} tiny layers",
            notes=["give the family explicit layer lists in moedsl/models/tiny.py:_FAMILY"],
        )
    n_layers = max(n_layers, len(picked))
    nxt = picked[-1] + 1
    while len(picked) < n_layers and nxt < n_base:
        picked.append(nxt)
        nxt += 1
    return {k: [base_lists[k][i] for i in picked] for k in keys}


def is_composite(config) -> bool:
    """A vision-language or omni wrapper: the text decoder's config is a sub-config."""
    subs = getattr(config, "sub_configs", None) or {}
    return any(key in subs for key in ("text_config", "thinker_config"))


def _shrink_composite(config) -> dict:
    """Overrides for a composite config: every text sub-config shrunk like a causal LM, every
    vision/audio sub-config to a couple of tiny blocks; nested composites (omni's thinker) recursively."""
    d = config.to_dict()
    subs = getattr(config, "sub_configs", None) or {}
    out: dict[str, Any] = {}
    if "vocab_size" in d and _layer_count_key(d) in d and not is_composite(config):
        attribute_map = dict(getattr(config, "attribute_map", {}) or {})
        out = _shrink(config.model_type, d, attribute_map)
        for key, value in list(out.items()):  # per-modality widths (ernie4_5_vl: [text, vision] experts)
            if isinstance(d.get(key), list) and isinstance(value, int):
                out[key] = [value + 8 * j for j in range(len(d[key]))]
        if not config.model_type.startswith("llama4"):
            # multimodal rotary sections (t, h, w), fitted to the final widths by tiny_config (`_fit_mrope`)
            rope = dict(d.get("rope_parameters") or {})
            rope["mrope_section"] = rope.get("mrope_section") or _MROPE_DEFAULT.get(config.model_type, [8, 12, 12])
            out["rope_parameters"] = rope
    elif "vocab_size" not in d or "vision" in config.model_type or "audio" in config.model_type:
        out = {k: v for k, v in _TOWER.items() if k in d}
    for key in subs:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out[key] = _shrink_composite(sub)
    return out


def _fit_mrope(text: dict) -> None:
    """Scale a text config's multimodal rotary sections (t, h, w), if it has them, to add up to half its
    rotary width, in place."""
    rope = text.get("rope_parameters")
    if not isinstance(rope, dict) or not rope.get("mrope_section"):
        return
    head_dim = text.get("head_dim") or text.get("hidden_size", TINY_HIDDEN) // text.get("num_attention_heads", TINY_HEADS)
    half = int(head_dim * float(rope.get("partial_rotary_factor", 1.0))) // 2
    sections = rope["mrope_section"]
    new = [max(1, s * half // sum(sections)) for s in sections]
    new[-1] += half - sum(new)
    text["rope_parameters"] = {**rope, "mrope_section": new}


def _fit_mrope_all(kw: dict) -> None:
    """_fit_mrope on every sub-config of a composite's keyword arguments (omni nests its text config)."""
    _fit_mrope(kw)
    for value in kw.values():
        if isinstance(value, dict):
            _fit_mrope_all(value)


def tiny_config(model_type: str, **overrides):
    """`AutoConfig.for_model(model_type)` shrunk to a tiny size with every layer kind present.

    `overrides` are applied last (any config attribute). Eager attention and eager experts are
    selected so CPU runs are simple and deterministic. Composite (vision-language, omni) configs
    have every sub-config shrunk: text, vision and audio.
    """
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as exc:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        from moedsl.errors import nearest

        raise MoedslError(
            f"unknown model_type `{model_type}` for this transformers",
            suggestion=nearest(model_type, CONFIG_MAPPING_NAMES),
            notes=([str(exc).splitlines()[0]] if str(exc) else [])
            + ["a family that ships its own modeling code is checked against a model directory or config.json "
               "beside that code: --model DIR (or --config FILE) with --trust-remote-code"],
        ) from None
    if is_composite(base):
        kw = {**_shrink_composite(base), **_COMPOSITE_FAMILY.get(model_type, {}), **overrides}
        kw.update({k: tie(kw) for k, tie in _COMPOSITE_TIED.get(model_type, {}).items() if k not in overrides})
        _fit_mrope_all(kw)  # after the overrides: a wider head needs wider sections
        config = _make_config(model_type, kw)
        _set_eager(config)
        return config
    return _shrunk(model_type, base, lambda kw: _make_config(model_type, kw), overrides)


def shrink_like(config, **overrides):
    """`config` shrunk as `tiny_config` shrinks a family's default, keeping its other values; for
    config classes transformers does not know (a model directory's own code)."""
    keep = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}

    def make(kw: dict):
        try:
            with quiet_transformers():
                small = type(config)(**{**keep, **kw})
        except Exception as exc:  # the config class's own validation
            raise MoedslError(f"{config.model_type}: the shrunk config is not valid: {type(exc).__name__}: {exc}",
                              notes=[f"overrides: {kw}"]) from None
        small._name_or_path = config._name_or_path  # where its own code lives
        return small

    return _shrunk(str(config.model_type), config, make, overrides)


def _shrunk(model_type: str, base, make, overrides: dict):
    """`make(kwargs)` with the tiny sizes for `base`'s keys, then every layer kind of `base` restored."""
    d = base.to_dict()
    attribute_map = dict(getattr(base, "attribute_map", {}) or {})
    kw = _shrink(model_type, d, attribute_map)
    # an alias (num_experts -> num_local_experts, ...) must replace the real key, not race it
    overrides = {attribute_map.get(k, k): v for k, v in overrides.items()}
    n_layers = kw.get(_layer_count_key(d), 2)
    family_keys = set(kw) - set(_ALWAYS) - set(_IF_SET)
    kw.update(overrides)
    config = make(kw)
    fixed = family_keys | set(overrides) | set(_FAMILY.get(model_type, (0, {}))[1] or {})
    fix = _fix_layer_kinds(
        model_type, layer_kind_lists(base), layer_kind_lists(config), {k: kw[k] for k in fixed if k in kw}, n_layers
    )
    if fix:
        kw.update(fix)
        kw[_layer_count_key(d)] = len(next(iter(fix.values())))
        config = make(kw)
    _set_eager(config)
    return config


def _make_config(model_type: str, kw: dict):
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **kw)
    except Exception as exc:  # config validation of transformers
        raise MoedslError(
            f"{model_type}: the shrunk config is not valid: {type(exc).__name__}: {exc}",
            notes=[f"overrides: {kw}"],
        ) from exc


def _set_eager(config) -> None:
    """Eager attention and eager experts (deterministic, hookable, no grouped_mm) where supported."""
    for cfg in _all_configs(config):
        for attr in ("_attn_implementation", "_experts_implementation"):
            try:
                setattr(cfg, attr, "eager")
            except Exception:  # older config classes without the property
                pass


def _all_configs(config):
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _all_configs(sub)  # nested: omni's thinker holds text, vision and audio configs


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings and progress bars for the duration (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _is_router_weight(name: str, param: torch.Tensor, n_experts: set[int], hidden: int) -> bool:
    if param.dim() != 2 or param.shape[1] != hidden or param.shape[0] not in n_experts:
        return False
    parts = name.split(".")
    if "experts" in parts or "shared_expert" in parts or "shared_experts" in parts:
        return False
    return any(p in ("gate", "router", "wg", "classifier", "layer") for p in parts[-3:])


def _expert_counts(config) -> set[int]:
    counts: set[int] = set()
    for cfg in _all_configs(config):
        for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 1:
                counts.add(v)
        ffn = getattr(cfg, "ffn_config", None)
        if ffn is not None and isinstance(getattr(ffn, "moe_num_experts", None), int):
            counts.add(ffn.moe_num_experts)
        z = getattr(cfg, "zero_expert_num", None)
        if isinstance(z, int) and z > 0:
            counts |= {c + z for c in set(counts)}
    return counts


def _hidden(config) -> int:
    for key in ("hidden_size", "d_model"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return TINY_HIDDEN


@torch.no_grad()
def _spread_routers(model, seed: int) -> list[str]:
    """Give every router weight N(0, (1.5/sqrt(H))^2) so routing really varies across tokens, and
    small random values to score-correction biases (so 'bias picks, does not weigh' matters)."""
    config = model.config
    hidden = _hidden(config)
    counts = _expert_counts(config)
    gen = torch.Generator().manual_seed(10_007 + seed)
    touched = []
    for name, param in model.named_parameters():
        if _is_router_weight(name, param, counts, hidden):
            value = torch.randn(param.shape, generator=gen) * (1.5 / math.sqrt(hidden))
            param.copy_(value.to(param.dtype))
            touched.append(name)
    for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
        if "e_score_correction_bias" in name and buf.is_floating_point():
            buf.copy_((torch.randn(buf.shape, generator=gen) * 0.05).to(buf.dtype))
            touched.append(name)
    return touched


def model_class(config, trust_remote_code: bool = False):
    """The transformers class a checkpoint of this config is: the causal LM of a text model; for a
    composite (vision-language, omni), the multimodal `…ForConditionalGeneration` that holds the
    text decoder (never the text-only class, whose checkpoint names differ); with
    `trust_remote_code` and an `auto_map`, the class the model directory's own code defines."""
    import transformers
    from transformers.models.auto import modeling_auto

    if trust_remote_code and getattr(config, "auto_map", None):
        return transformers.AutoModelForCausalLM  # resolves the auto_map entry, as from_pretrained does
    mt = str(getattr(config, "model_type", ""))
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None:
            return cls
    mappings = ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if not is_composite(config):
        mappings = mappings[::-1]
    for mapping in mappings:
        name = getattr(modeling_auto, mapping, {}).get(mt)
        if name and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    raise MoedslError(f"model_type `{mt}` ({type(config).__name__}) has no causal-LM or multimodal-LM class in "
                      f"transformers {transformers.__version__}",
                      notes=["moedsl quantizes decoder LMs: a causal LM, or a composite model that holds one"])


def _instantiate(cls, config, **kwargs):
    """cls(config) with its own init: `_from_config` of a model class, `from_config` of an Auto class."""
    make = getattr(cls, "_from_config", None) or cls.from_config
    return make(config, **kwargs)


def build_model(config, device: str | torch.device = "meta", seed: int = 0, dtype: torch.dtype = torch.float32,
                trust_remote_code: bool = False):
    """Instantiate the model of `config` (`model_class`: the causal LM, or the composite holding it).

    device="meta": structure only, no storage. device="cpu" (or another real device):
    deterministic random weights from the model's own init under `torch.manual_seed(seed)`,
    with routers spread (see `_spread_routers`). Returned in eval mode. `trust_remote_code`: the
    model class may come from the config's `auto_map` (see moedsl.models.remote).
    """
    cls = model_class(config, trust_remote_code)
    device = torch.device(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    with quiet_transformers():
        if device.type == "meta":
            with torch.device("meta"):
                model = _instantiate(cls, config, **kwargs)
        else:
            fork_devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed)
                model = _instantiate(cls, config, **kwargs)
                _spread_routers(model, seed)
            model = model.to(device)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


# model_type -> (pattern, replacement) pairs on checkpoint keys, where transformers' save_pretrained does not write
# the names the released checkpoints have:
# - Kimi-Linear's release keeps the dense layers' MLP under `mlp.` and only the MoE under `block_sparse_moe.` (as
#   vLLM's class does); transformers loads `.block_sparse_moe.` as `.mlp.` and, saving, turns every `.mlp.` back
#   into `.block_sparse_moe.`
# - Kimi-K2.5's vision tower has `encoder.blocks.`, which transformers loads as `layers` by a rename of every
#   `blocks` and, saving, reverses on every `layers`: the text model's too (`language_model.model.blocks.0...`,
#   vLLM: "KeyError: 'blocks.0.input_layernorm.weight'"). Its projector's norm is `mm_projector.pre_norm` in the
#   release (transformers' load renames `mm_projector.proj.*` only; it saves the norm under its runtime prefix),
#   and its patch embedding `vision_tower.patch_embed.` (transformers loads `vision_tower.encoder.` and
#   `vision_tower.` both as `model.vision_tower.`, and saves the patch embedding under the first)
RELEASED_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "kimi_linear": ((r"\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.", r".mlp.\1."),),
    "kimi_k25": ((r"^language_model\.model\.blocks\.", "language_model.model.layers."),
                 (r"^model\.mm_projector\.", "mm_projector."),
                 (r"^vision_tower\.encoder\.patch_embed\.", "vision_tower.patch_embed.")),
}


def save_tiny(model_type: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Build a tiny `model_type` on CPU and `save_pretrained` it (safetensors) with a byte-level
    tokenizer into `out_dir`, under the names its released checkpoints use (RELEASED_KEYS).
    Returns the directory."""
    from moedsl.models.default import save_byte_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, **overrides)
    model = build_model(config, device="cpu", seed=seed)
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        save_byte_tokenizer(out)
    released_keys(out, model_type)
    return out


# the image-processor backends transformers (5.2x) offers, in the order tried: PIL first, since transformers'
# torchvision-backed classes need a torchvision built for the installed torch
_IMAGE_BACKENDS = ("pil", "torchvision")
# the special tokens a family's processor reads off its tokenizer (AriaProcessor: `tokenizer.image_token`), each
# with the config key that holds its id (a dotted path into a nested config; None where the config holds none): the
# byte tokenizer gets them, and the config their ids
_OMNI_TOKENS = {  # Qwen3OmniMoeProcessor.__init__ reads all seven
    "image_token": ("<|image_pad|>", "image_token_id"), "video_token": ("<|video_pad|>", "video_token_id"),
    "audio_token": ("<|audio_pad|>", "audio_token_id"), "audio_bos_token": ("<|audio_start|>", "audio_start_token_id"),
    "audio_eos_token": ("<|audio_end|>", None), "vision_bos_token": ("<|vision_start|>", None),
    "vision_eos_token": ("<|vision_end|>", None),
}
_PROCESSOR_TOKENS: dict[str, dict[str, tuple[str, str | None]]] = {
    "aria": {"image_token": ("<|img|>", "image_token_index")},
    # vllm/.../models/kimi_k25.py resolves the media token from the tokenizer and builds its dummy prompts with it
    "kimi_k25": {"image_token": ("<|media_pad|>", "image_token_id")},
    "qwen3_omni_moe": {name: (token, key and f"thinker_config.{key}") for name, (token, key) in _OMNI_TOKENS.items()},
    "qwen3_omni_moe_thinker": _OMNI_TOKENS,
}
# model_type -> preprocessor_config.json as the family's release ships it, where that is not transformers' class:
# Kimi-K2.5's is its remote-code processor's `media_proc_cfg`, which vLLM's own image processor reads
# (vllm/transformers_utils/processors/kimi_k25_vision_fused.py; no torchvision). Values: transformers'
# Kimi_K25ImageProcessor and Kimi_K25VideoProcessor defaults (patch 14, merge 2, at most 16384 patches and 512 a
# side; 4 frames a chunk, 4096 patches a frame; ImageNet-standard mean and std)
_RELEASED_PREPROCESSORS: dict[str, dict] = {
    "kimi_k25": {"media_proc_cfg": {"patch_size": 14, "merge_kernel_size": 2, "in_patch_limit": 16384,
                                    "patch_limit_on_one_side": 512, "fixed_output_tokens": None,
                                    "temporal_merge_kernel_size": 4, "in_patch_limit_each_frame": 4096,
                                    "in_patch_limit_video": None, "image_mean": [0.5, 0.5, 0.5],
                                    "image_std": [0.5, 0.5, 0.5]}},
}
# a family whose checkpoint is one part of a composite that transformers maps the processor to: that composite's
# processor. transformers maps none to `qwen3_omni_moe_thinker`; the thinker is served from Qwen3-Omni's release,
# whose processor is Qwen3OmniMoeProcessor (vLLM's Qwen3-Omni class asks for exactly that class)
_PROCESSOR_FAMILY = {"qwen3_omni_moe_thinker": "qwen3_omni_moe"}


def save_processor(model_type: str, out_dir: str | Path) -> list[str]:
    """Write beside a tiny composite's checkpoint the processor files an engine serving it reads: the image
    processor of the family (transformers' own class, at its defaults) and, for a family with audio input, its
    feature extractor (at its defaults), both in preprocessor_config.json as the releases store them (one file, each
    class reading its own keys); where the family's processor reads special tokens off the tokenizer
    (`_PROCESSOR_TOKENS`), the byte tokenizer again with them, their ids in config.json. Where transformers maps
    the processor to another family (`_PROCESSOR_FAMILY`), the file names it (`processor_class`), so that
    AutoProcessor finds it. Returns the files written; none for a family transformers maps no image processor to
    (a text model). Where the release's preprocessor_config.json is not transformers' class
    (`_RELEASED_PREPROCESSORS`), that file as the release has it. Video processors are not written: every one of
    transformers 5.2x is torchvision-backed only; transformers' AutoVideoProcessor reads preprocessor_config.json
    where no video_preprocessor_config.json is. The processor's own processor_config.json is not written (its
    defaults are the class's)."""
    import json

    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES as FEATURES
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES as IMAGE
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES as PROCESSOR

    if model_type in _RELEASED_PREPROCESSORS:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "preprocessor_config.json").write_text(json.dumps(_RELEASED_PREPROCESSORS[model_type], indent=2) + "\n")
        return ["preprocessor_config.json"] + _save_processor_tokens(model_type, out)
    family = _PROCESSOR_FAMILY.get(model_type, model_type)
    names = IMAGE.get(family)
    if not names and PROCESSOR.get(family):  # a processor shared with another family (glm4v_moe's is glm4v's,
        # Glm4vProcessor): that family's image processor, as the releases' preprocessor_config.json names it
        names = next((IMAGE[t] for t, p in PROCESSOR.items() if p == PROCESSOR[family] and IMAGE.get(t)), None)
    if not names:
        return []
    # transformers 5.2x maps backend -> class name; earlier 5.x (slow, fast)
    ordered = [names.get(b) for b in _IMAGE_BACKENDS] if isinstance(names, dict) else list(names)
    failures = []
    for name in filter(None, ordered):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            processor = cls()
        except ImportError as exc:  # transformers' placeholder for a class whose backend is not installed
            failures.append(f"{name}: {' '.join(str(exc).split())[:160]}")
            continue
        out = Path(out_dir)
        with quiet_transformers():
            processor.save_pretrained(out)
        if FEATURES.get(family) or family != model_type:
            path = out / "preprocessor_config.json"
            merged = json.loads(path.read_text())
            if FEATURES.get(family):
                features = getattr(transformers, FEATURES[family])().to_dict()
                shared = sorted(set(merged) & set(features) - {"processor_class"})
                if shared:  # one file holds both: each class would read the other's value
                    raise MoedslError(f"{model_type}: {name} and {FEATURES[family]} both store {shared}",
                                      notes=["preprocessor_config.json cannot hold both"])
                merged.update(features)
            if family != model_type:
                merged["processor_class"] = PROCESSOR[family]
            path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
        return ["preprocessor_config.json"] + _save_processor_tokens(model_type, out)
    raise MoedslError(f"{model_type}: no image processor of transformers {transformers.__version__} can be built here",
                      notes=failures or [f"transformers names {sorted(filter(None, ordered))} but has none of them"]
                      + ["PIL-backed image processors need pillow (requirements/cpu.txt installs it)"])


def _save_processor_tokens(model_type: str, out: Path) -> list[str]:
    """The byte tokenizer with the family's processor tokens (`_PROCESSOR_TOKENS`), and config.json with their ids."""
    import json

    from transformers import AutoTokenizer

    from moedsl.models.default import save_byte_tokenizer

    tokens = _PROCESSOR_TOKENS.get(model_type)
    if not tokens:
        return []
    with quiet_transformers():
        save_byte_tokenizer(out, {name: token for name, (token, _) in tokens.items()})
        tokenizer = AutoTokenizer.from_pretrained(out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    for token, key in tokens.values():
        if key is None:
            continue
        *parents, leaf = key.split(".")
        holder = config
        for part in parents:
            holder = holder[part]
        holder[leaf] = tokenizer.convert_tokens_to_ids(token)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "config.json"]


def released_keys(out: Path, model_type: str) -> None:
    """Rename the keys of a checkpoint `save_pretrained` wrote into `out` as the family's releases spell them
    (RELEASED_KEYS; nothing for other families)."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    if model_type not in RELEASED_KEYS:
        return
    def released(key: str) -> str:
        for pattern, replacement in RELEASED_KEYS[model_type]:
            key = re.sub(pattern, replacement, key)
        return key

    for shard in sorted(Path(out).glob("*.safetensors")):
        tensors = load_file(str(shard))
        save_file({released(k): v for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    index = Path(out) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {released(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def survey(types: tuple[str, ...] | None = None, seq_len: int = 8) -> dict[str, str]:
    """Try every type: tiny config, meta and CPU build, one forward. type -> 'ok' or the error."""
    results: dict[str, str] = {}
    for mt in types or available_tiny():
        try:
            config = tiny_config(mt)
            build_model(config, "meta")
            model = build_model(config, "cpu")
            ids = torch.arange(seq_len).unsqueeze(0) % 200
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            if not torch.isfinite(logits).all():
                raise RuntimeError("non-finite logits")
            results[mt] = "ok"
        except Exception as exc:  # survey: report, never stop
            results[mt] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return results


if __name__ == "__main__":  # pragma: no cover - manual survey
    import sys

    for mt, res in survey(tuple(sys.argv[1:]) or None).items():
        print(f"{mt:24s} {res}")
