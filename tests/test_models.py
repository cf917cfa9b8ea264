"""Tiny models from transformers' own configs, and the built-in default model."""

from __future__ import annotations

import json

import pytest
import torch

from moedsl.errors import MoedslError
from moedsl.models import default as default_mod
from moedsl.models.tiny import (
    DENSE_TINY,
    MOE_TINY,
    RELEASED_KEYS,
    SUPPORTED_TINY,
    TINY_NUM_EXPERTS,
    UNSUPPORTED_TINY,
    available_tiny,
    build_model,
    save_tiny,
    tiny_config,
)

AVAILABLE = available_tiny()
IDS = (torch.arange(12) * 37 % 250).unsqueeze(0)


def _layers(model):
    from moedsl.execute.loader import find_decoder_layers

    return find_decoder_layers(model)[1]


def test_reference_families_are_supported():
    # every MoE family of shared/reference/transformers-moe.md, and the dense ones of the brief
    for mt in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "dbrx", "llama4_text", "jamba", "longcat_flash"):
        assert mt in MOE_TINY
    assert set(DENSE_TINY) >= {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2"}
    assert not set(SUPPORTED_TINY) & set(UNSUPPORTED_TINY)
    assert all(reason for reason in UNSUPPORTED_TINY.values())
    assert set(MOE_TINY) <= set(AVAILABLE)  # all exist in transformers >= 5.17


@pytest.mark.parametrize("model_type", AVAILABLE)
def test_build_forward_and_round_trip(model_type, tmp_path):
    config = tiny_config(model_type)
    meta = build_model(config, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    model = build_model(config, device="cpu", seed=0)
    assert all(p.device.type == "cpu" for p in model.parameters())
    # tiny: well under a few MB of float32
    assert sum(p.numel() for p in model.parameters()) < 2_500_000
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.shape[:2] == IDS.shape
    assert torch.isfinite(logits).all()

    from transformers import AutoModelForCausalLM

    out = save_tiny(model_type, tmp_path / model_type, seed=0)
    assert list(out.glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        again = loaded(input_ids=IDS).logits
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)


# keys each family's release has where save_pretrained alone writes others (RELEASED_KEYS), and keys it keeps
RELEASED_NAMES = {
    "kimi_linear": ("model.layers.0.mlp.gate_proj.weight",  # layer 0 is dense
                    "model.layers.1.block_sparse_moe.experts.0.w1.weight"),  # the MoE keeps its released names
    "kimi_k25": ("language_model.model.layers.0.input_layernorm.weight", "mm_projector.pre_norm.weight",
                 "vision_tower.patch_embed.proj.weight", "vision_tower.encoder.blocks.0.wqkv.weight"),
}


@pytest.mark.parametrize("model_type", sorted(RELEASED_KEYS))
def test_saved_under_the_released_names(model_type, tmp_path):
    """save_pretrained writes Kimi-Linear's dense MLP as `block_sparse_moe.*` (its load-time rename, reversed),
    and Kimi-K2.5's text layers as `blocks` (its vision tower's rename, reversed on every `layers`); the releases
    and vLLM have `mlp.*` and `layers` there. The fixture is saved under the released names, and transformers
    loads them as the same model."""
    import re

    from safetensors import safe_open

    from moedsl.models.tiny import model_class

    out = save_tiny(model_type, tmp_path / model_type, seed=0)
    keys = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert not [k for k in keys for pattern, _ in RELEASED_KEYS[model_type] if re.search(pattern, k)]
    assert set(RELEASED_NAMES[model_type]) <= keys
    config = tiny_config(model_type)
    loaded = model_class(config).from_pretrained(out)
    built = build_model(config, device="cpu", seed=0).state_dict()
    assert loaded.state_dict().keys() == built.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in built.items())


def test_sizes_are_tiny_and_distinct():
    c = tiny_config("qwen3_moe")
    assert (c.hidden_size, c.num_local_experts, c.num_experts_per_tok) == (64, TINY_NUM_EXPERTS, 2)
    assert c.moe_intermediate_size != c.hidden_size != c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (c.num_attention_heads, c.num_key_value_heads, head_dim, c.vocab_size) == (4, 2, 16, 320)
    d = tiny_config("dbrx")
    assert (d.d_model, d.ffn_config.moe_num_experts, d.ffn_config.moe_top_k, d.attn_config.kv_n_heads) == (64, 8, 2, 2)
    e = tiny_config("ernie4_5_moe")
    assert (e.moe_num_experts, e.moe_k) == (8, 2)
    g = tiny_config("deepseek_v3")
    assert g.n_routed_experts % g.n_group == 0 and g.topk_group <= g.n_group
    assert g._experts_implementation == "eager"


def _mlp_kinds(model) -> set[str]:
    kinds = set()
    for layer in _layers(model):
        names = {n for n, _ in layer.named_modules()}
        kinds.add("moe" if any(n.endswith("experts") for n in names) else "dense")
    return kinds


@pytest.mark.parametrize(
    "model_type", ["qwen3_moe", "qwen2_moe", "qwen3_next", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text", "jamba"]
)
def test_dense_and_moe_layers_both_present(model_type):
    assert _mlp_kinds(build_model(tiny_config(model_type), "meta")) == {"dense", "moe"}


@pytest.mark.parametrize(
    "model_type, mixers",
    [("qwen3_next", {"linear_attn", "self_attn"}), ("qwen3_5_moe_text", {"linear_attn", "self_attn"}), ("jamba", {"mamba", "self_attn"})],
)
def test_hybrid_mixers_both_present(model_type, mixers):
    seen = set()
    for layer in _layers(build_model(tiny_config(model_type), "meta")):
        seen |= {name for name, _ in layer.named_children()} & mixers
    assert seen == mixers


def test_attention_kinds_kept():
    assert set(tiny_config("gpt_oss").layer_types) == {"sliding_attention", "full_attention"}
    assert set(tiny_config("gemma3_text").layer_types) == {"sliding_attention", "full_attention"}
    assert set(tiny_config("minimax").layer_types) == {"full_attention", "linear_attention"}


def test_overrides_win():
    c = tiny_config("mixtral", num_local_experts=4, num_hidden_layers=3)
    assert (c.num_local_experts, c.num_hidden_layers) == (4, 3)


def test_unknown_model_type_is_a_moedsl_error():
    with pytest.raises(MoedslError) as err:
        tiny_config("qwen3_mo")
    assert "qwen3_mo" in str(err.value)
    assert err.value.suggestion == "qwen3_moe"


def test_weights_are_deterministic():
    config = tiny_config("qwen3_moe")
    a = build_model(config, "cpu", seed=0).state_dict()
    b = build_model(config, "cpu", seed=0).state_dict()
    c = build_model(config, "cpu", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "dbrx", "phimoe", "llama4_text"])
def test_routing_varies_across_tokens(model_type):
    """Routers get spread weights: the tokens of one short batch reach most experts."""
    model = build_model(tiny_config(model_type), "cpu", seed=0)
    chosen: set[int] = set()

    def router_hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        if logits.dim() == 2 and logits.shape[-1] >= TINY_NUM_EXPERTS:
            chosen.update(logits.float().topk(2, dim=-1).indices.flatten().tolist())

    handles = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and "experts" not in name:
            handles.append(module.register_forward_hook(router_hook))
    assert handles, "no router found"
    with torch.no_grad():
        model(input_ids=(torch.arange(32) * 13 % 250).unsqueeze(0))
    for h in handles:
        h.remove()
    assert len(chosen) >= TINY_NUM_EXPERTS // 2, chosen


# ----------------------------------------------------------------------------- default model


def test_default_model_dir(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_mod.default_model_dir(tmp_path)
    assert path == tmp_path / default_mod.DEFAULT_NAME
    assert [p.name for p in tmp_path.iterdir()] == [default_mod.DEFAULT_NAME]  # no temp leftovers
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3_moe"
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts_per_tok) == (4, 128, 4)
    assert config.num_local_experts == 16 and config.mlp_only_layers == [0]
    assert config.vocab_size == default_mod.BYTE_VOCAB_SIZE
    tok = AutoTokenizer.from_pretrained(path)
    text = "Grüße, 世界! {\"a\": 1}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 257 and len(tok) == default_mod.BYTE_VOCAB_SIZE
    model = AutoModelForCausalLM.from_pretrained(path)
    assert _mlp_kinds(model) == {"dense", "moe"}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()
    # checkpoint names are the per-expert ones serving engines expect
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] if (
        path / "model.safetensors.index.json"
    ).exists() else None
    from safetensors import safe_open

    keys = set(weight_map) if weight_map else set(safe_open(str(path / "model.safetensors"), "pt").keys())
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys

    # second call: reused, not rewritten
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_mod.default_model_dir(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_model_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(default_mod.default_model_dir(tmp_path / "a") / "model.safetensors")
    b = load_file(default_mod.default_model_dir(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_model_respects_moedsl_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDSL_CACHE", str(tmp_path / "cache"))
    assert default_mod.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("MOEDSL_CACHE")
    assert default_mod.cache_root() == default_mod.Path.home() / ".cache" / "moedsl"


def test_default_model_killed_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(path):
        (path / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(default_mod, "_write_default", boom)
    with pytest.raises(KeyboardInterrupt):
        default_mod.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_model_replaces_a_damaged_dir(tmp_path):
    broken = tmp_path / default_mod.DEFAULT_NAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    path = default_mod.default_model_dir(tmp_path)
    assert (path / "model.safetensors").is_file() and default_mod._is_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [default_mod.DEFAULT_NAME]


def test_default_model_unwritable_cache_is_a_moedsl_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MoedslError) as err:
        default_mod.default_model_dir(blocker / "cache")
    assert "MOEDSL_CACHE" in str(err.value)


def test_supported_families_cover_their_full_size_layer_kinds():
    """Every structural layer kind of the full-size default config appears in the tiny model."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    def kinds(model):
        out = set()
        for layer in _layers(model):
            out.add(
                tuple(sorted({(re.sub(r"\.\d+(\.|$)", r".#\1", n), type(m).__name__) for n, m in layer.named_modules()}))
            )
        return out

    for mt in ("deepseek_v3", "glm4_moe", "qwen3_next", "jamba", "minimax", "gpt_oss"):
        with torch.device("meta"):
            big = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt))
        assert kinds(big) <= kinds(build_model(tiny_config(mt), "meta")), mt


def test_a_composite_with_a_wider_text_head_gets_rotary_sections_that_fit():
    """Overrides applied after shrinking (the serving check widens the text model for vLLM's kernels) get
    multimodal rotary sections that add up to half the new rotary width, so the model runs."""
    from moedsl.models.tiny import build_model, tiny_config

    base = tiny_config("glm4v_moe").text_config.to_dict()
    config = tiny_config("glm4v_moe", text_config={**base, "hidden_size": 128})
    text = config.text_config
    rotary = int(text.hidden_size // text.num_attention_heads * text.rope_parameters["partial_rotary_factor"])
    assert sum(text.rope_parameters["mrope_section"]) == rotary // 2
    model = build_model(config, device="cpu")
    logits = model(input_ids=torch.randint(0, 64, (1, 8))).logits
    assert torch.isfinite(logits).all()
