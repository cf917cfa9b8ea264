"""Which MoE model types of the installed transformers the library covers, and why not the others.

    python -m moedsl.lang.docs_table --coverage     (or python -m moedsl.lang.coverage)

A model type counts as MoE when its default config (`AutoConfig.for_model`), or one of its
sub-configs (a composite's `text_config`), has an expert count of at least one. It is covered
when a library definition `match`es it. Every other one gets its reason from the data below:
`REASONS` for families examined one by one, else the reason of its category (a composite
wrapper whose language model has a reason; the language model of a composite with no causal-LM
class of its own; not a causal LM at all). A type with no reason is printed as such and makes the
command exit 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# Families examined one by one that a correct definition cannot be written for with today's
# language (or that are another part of the work). Each reason names what is missing.
REASONS: dict[str, str] = {
    "sarvam_moe": (
        "checkpoint names: q/k/v are three runtime Linears but ONE checkpoint tensor "
        "(`attention.query_key_value`, split at load); `@ \"name\"` renames one target, and the writers have no "
        "way to write three quantized targets as one concatenated tensor."
    ),
    "lara_mini": (
        "checkpoint names: the Gated DeltaNet's four runtime Linears `in_proj_qkv`, `in_proj_z`, `in_proj_b`, "
        "`in_proj_a` are ONE checkpoint tensor `linear_attn.in_proj` (rows [q|k|v|z|b|a], split at load); as for "
        "sarvam_moe, a definition cannot write several quantized targets as one tensor."
    ),
    "zaya": (
        "the router resolves its skip slot itself: a choice of the extra class E becomes expert 0 with routing "
        "weight 0 before `ZayaExperts` is called, so the experts module sees index 0 for tokens that skip; under "
        "`routed`/`auto` those tokens would be counted as expert 0's calibration tokens (`extra` slots are for "
        "routers that pass the slot index on, as LongCat's does). Its router is an MLP (`mlp.gate.router_mlp`, "
        "`:!`)."
    ),
    "doge": (
        "experts are rows of two nn.Embedding tables (`mlp.down_embed`, `mlp.up_embed`: one hidden unit per "
        "expert, 16384 of them) picked by product-key routing beside a dense MLP (CDMoE); the language's "
        "experts are matrices ([E, out, in] tensors or a ModuleList). The default config is dense (`is_moe=False`)."
    ),
    "gemma4_text": (
        "no MoE block module: with `enable_moe_block` the router and the experts are attributes of the decoder "
        "layer itself (`router`, `experts`), and `:moe` marks a module inside the layer; the router also reads "
        "the un-normed residual while the experts read `pre_feedforward_layernorm_2`'s output, which a `:moe` "
        "block's single input cannot say. The default config is dense."
    ),
    "deepseek_v4": (
        "the attention's output projection `o_a_proj` is a `DeepseekV4GroupedLinear` (a 2-D weight, not an "
        "nn.Linear): a stage takes only nn.Linear weights, and keeping it `:!` leaves part of every attention in "
        "full precision; hash-routed MoE layers (`mlp_layer_types` `hash_moe`) pick experts from token ids, not "
        "from the hidden states the executor routes with; layers exchange several residual streams "
        "(hyper-connections `attn_hc`/`ffn_hc`)."
    ),
    "hy_v4": (
        "hyper-connections: decoder layers exchange several residual streams (`attn_hc`/`ffn_hc`, merged by "
        "`model.hc_head`), so a layer's input and output are not one [tokens, hidden] tensor; the executor "
        "routes, captures and replays layers on one stream, and that it does so correctly for several is "
        "untested. The rest (MLA + indexer + output gate) is expressible as for dots3_note_text."
    ),
    "qwen4_exp_text": (
        "hyper-connections: every layer mixes several residual streams through Linears "
        "(`attn_hyper_connection`/`mlp_hyper_connection`, `model.hyper_connection_mixer` over 4·H+ inputs), so a "
        "layer's input and output are not one [tokens, hidden] tensor (as for hy_v4); the rest is qwen3_5_moe's "
        "hybrid plus an indexer."
    ),
    "inkling_text": (
        "shared experts are fused 3-D parameters (`mlp.shared_experts.gate_proj` [S, I, H], not Linears): a "
        "`:moe-share` block holds Linears and a `:moe` block has exactly one `:experts`; the router has E + 1 "
        "outputs (a sink expert: zero experts)."
    ),
    "inkling2_text": "as inkling_text: fused 3-D shared experts beside the routed ones, and a sink expert in the router.",
    "inkling2_loop_text": "as inkling_text (fused 3-D shared experts, a sink expert), plus looped layers.",
    # composites whose language model is covered (or expressible) but which no test model can be built for
    "dots3_note": (
        "not validated: the default config's `text_config.per_layer_config` overrides layers 25-41, which a "
        "shrunk (2-layer) config refuses, so no tiny model can be built to check a definition against (the text "
        "model `dots3_note_text` is covered; the composite would be it plus `language_model`/`towers`)."
    ),
    "nemotron_h_omni": (
        "not validated: the shrunk config is refused (`vision_config.video_temporal_patch_size` None vs "
        "`video_temporal_patch_size` 2 must be equal), so no tiny model can be built to check a definition against "
        "(the language model `nemotron_h` is covered)."
    ),
    "nemo_speechlm": (
        "not validated: the shrunk config is refused (`head_config.audio_hidden_size` must match "
        "`audio_config.hidden_size`), so no tiny model can be built to check a definition against (the language "
        "model `nemotron_h` is covered)."
    ),
    "glm5_next": (
        "not validated: the shrunk config is refused (`index_topk` must be divisible by `index_kpool` 16), so no "
        "tiny model can be built to check a definition against; its language model `glm5_next_text` has no "
        "causal-LM class of its own."
    ),
    "muse_spark": (
        "not validated: the shrunk config is refused (`patch_sizes`, `hidden_sizes` and `depths` need one entry "
        "per layer), so no tiny model can be built to check a definition against."
    ),
    "deepseek_ocr2": (
        "not validated: transformers' default config does not build a model (`TypeError: 'NoneType' object is "
        "not subscriptable` while shrinking its sub-configs), so no tiny model can be built to check a "
        "definition against."
    ),
    "step3p7": (
        "not validated: the default `text_config.mlp_layer_types` makes the first layers dense, so the two layers "
        "of a tiny model have no MoE block to check a definition's experts against (attention: q/k/v/o with q/k "
        "norms and a per-head gate `g_proj`, all expressible)."
    ),
    "minimax_m3_vl": (
        "checkpoint names: the composite's checkpoint stores the shared expert's (and the dense MLPs') ONE runtime "
        "Linear `gate_up_proj` as TWO tensors `gate_proj` + `up_proj` (concatenated at load), and the routed "
        "experts per expert (`block_sparse_moe.experts.{e}.w1/w3/w2`); a definition cannot write one quantized "
        "target as two checkpoint modules (the reverse of sarvam_moe). The text model `minimax_m3_vl_text`, "
        "whose checkpoint keeps `gate_up_proj`, is covered."
    ),
    "hy_v4_vl": (
        "its language model (`hy_v4_vl_text`) has hy_v4's hyper-connections (`attn_hc`/`ffn_hc`, `hc_head`): "
        "see `hy_v4`."
    ),
}

COMPOSITE = ("composite model: its language model (`{sub_type}`, in `config.{sub}`) cannot be written in the "
             "language: see `{sub_type}`")
TEXT_PART = ("the language model of a composite (`{parents}`): transformers has no causal-LM class for it on its own, "
             "so it is quantized through its composite")
NOT_CAUSAL = "not a decoder-only causal LM (transformers has no AutoModelForCausalLM class for it); moedsl quantizes causal LMs"


@dataclass(frozen=True)
class MoeType:
    model_type: str
    causal_lm: bool  # AutoModelForCausalLM has a class for it
    sub: str | None = None  # the sub-config holding the MoE model (composites), else None
    sub_type: str | None = None


def _expert_count(cfg) -> int:
    best = 0
    for key in EXPERT_COUNT_KEYS:
        try:
            v = getattr(cfg, key, None)
        except Exception:  # per-layer (heterogeneous) attributes refuse a global read: it is there
            v = 1
        if isinstance(v, int) and not isinstance(v, bool):
            best = max(best, v)
    ffn = getattr(cfg, "ffn_config", None)
    if ffn is not None and isinstance(getattr(ffn, "moe_num_experts", None), int):
        best = max(best, ffn.moe_num_experts)
    return best


def moe_model_types() -> dict[str, MoeType]:
    """Every MoE model type of the installed transformers (see the module docstring)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moedsl.models.tiny import quiet_transformers

    found: dict[str, MoeType] = {}
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in CONFIG_MAPPING_NAMES:
            try:
                cfg = AutoConfig.for_model(mt)
            except Exception:  # a config that cannot be built from its defaults has no default structure
                continue
            causal = mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            if _expert_count(cfg) >= 1:
                found[mt] = MoeType(mt, causal)
                continue
            for name in getattr(cfg, "sub_configs", None) or {}:
                sub = getattr(cfg, name, None)
                if sub is not None and hasattr(sub, "to_dict") and _expert_count(sub) >= 1:
                    found[mt] = MoeType(mt, causal, name, str(getattr(sub, "model_type", "") or name))
                    break
    return found


def covered_types() -> set[str]:
    from moedsl.lang.library import library_files, parse_cached

    return {mt for f in library_files() for mt in parse_cached(f).header.matches}


def reason(t: MoeType, types: dict[str, MoeType], covered: set[str] = frozenset()) -> str | None:
    """Why `t` is not covered (None: no reason recorded). `covered`: the model types the library covers."""
    if t.model_type in REASONS:
        return REASONS[t.model_type]
    if t.sub == "text_config":
        # a composite with no reason of its own: only when its language model has one
        return COMPOSITE.format(sub_type=t.sub_type, sub=t.sub) if t.sub_type in REASONS else None
    if not t.causal_lm:
        parents = sorted(p.model_type for p in types.values() if p.sub == "text_config" and p.sub_type == t.model_type)
        if not parents:
            return NOT_CAUSAL
        text = TEXT_PART.format(parents="`, `".join(parents))
        uncovered = [p for p in parents if p not in covered]
        return text + (f"; the composite is not covered either: see `{'`, `'.join(uncovered)}`" if uncovered else "")
    return None


def report() -> tuple[list[str], dict[str, str | None]]:
    """(covered MoE types, {not covered type: reason or None})."""
    types = moe_model_types()
    covered = covered_types()
    return (sorted(t for t in types if t in covered),
            {mt: reason(t, types, covered) for mt, t in sorted(types.items()) if mt not in covered})


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m moedsl.lang.coverage", description=__doc__.splitlines()[0]).parse_args(argv)
    import transformers

    covered, missing = report()
    total = len(covered) + len(missing)
    print(f"transformers {transformers.__version__}: {total} MoE model types; the library covers {len(covered)}, "
          f"not {len(missing)}.")
    print("\ncovered: " + ", ".join(covered))
    print("\nnot covered:")
    for mt, why in missing.items():
        print(f"  {mt}: {why or 'NO REASON RECORDED (add one to moedsl/lang/coverage.py REASONS)'}")
    return 1 if any(why is None for why in missing.values()) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
