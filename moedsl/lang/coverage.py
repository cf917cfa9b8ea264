"""Which MoE model types of the installed transformers the library covers, and why not the others.

    python -m moedsl.lang.docs_table --coverage     (or python -m moedsl.lang.coverage)

A model type counts as MoE when its default config (`AutoConfig.for_model`), or one of its
sub-configs (a composite's `text_config`), has an expert count of at least one. It is covered
when a library definition `match`es it. Every other one gets its reason from the data below:
`REASONS` for families examined one by one, else the reason of its category (a composite
wrapper; the language model of a composite with no causal-LM class of its own; not a causal
LM at all). A type with no reason is printed as such and makes the command exit 1.
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
        "zero experts: the router scores E + 1 classes and the extra one is a skip expert with no weights "
        "(`num_router_classes = num_experts + 1`); needs zero/identity experts. Its router is an MLP "
        "(`mlp.gate.router_mlp`), which can stay `:!`."
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
}

COMPOSITE = ("composite model: its MoE language model (`{sub_type}`, in `config.{sub}`) sits inside a multimodal "
             "wrapper; the language has no way yet to say where the language model sits (issue 12, composite models)")
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


def reason(t: MoeType, types: dict[str, MoeType]) -> str | None:
    """Why `t` is not covered (None: no reason recorded)."""
    if t.model_type in REASONS:
        return REASONS[t.model_type]
    if t.sub == "text_config":
        return COMPOSITE.format(sub_type=t.sub_type, sub=t.sub)
    if not t.causal_lm:
        parents = sorted(p.model_type for p in types.values() if p.sub == "text_config" and p.sub_type == t.model_type)
        return TEXT_PART.format(parents="`, `".join(parents)) if parents else NOT_CAUSAL
    return None


def report() -> tuple[list[str], dict[str, str | None]]:
    """(covered MoE types, {not covered type: reason or None})."""
    types = moe_model_types()
    covered = covered_types()
    return (sorted(t for t in types if t in covered),
            {mt: reason(t, types) for mt, t in sorted(types.items()) if mt not in covered})


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
