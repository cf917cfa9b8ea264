"""Layer-by-layer loading: exact parameters, same logits, one layer in memory at a time."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from moedsl.errors import MoedslError
from moedsl.execute.loader import LayerwiseLoader, find_decoder_layers, materialized_parameters
from moedsl.models.tiny import available_tiny, save_tiny

# qwen3_moe: fused experts via converters; mixtral/phimoe: on-disk names differ (block_sparse_moe,
# w1/w3/w2, gate->router); gpt_oss: no conversion; dbrx: transformer.blocks; deepseek_v3: MLA,
# dense+MoE, score-correction buffer; granitemoe: legacy renames; jamba/qwen3_next: hybrids;
# llama4_text: transposed experts, NoPE/chunked layers.
FAMILIES = available_tiny(
    (
        "qwen3_moe",
        "mixtral",
        "gpt_oss",
        "dbrx",
        "deepseek_v3",
        "phimoe",
        "granitemoe",
        "jamba",
        "qwen3_next",
        "llama4_text",
        "ernie4_5_moe",  # tied embeddings, moe_statics rename
        "longcat_flash",  # identity experts, router.classifier
        "gemma3_text",  # dense, tied, sliding + full attention
    )
)
IDS = (torch.arange(16) * 29 % 250).unsqueeze(0)
EAGER = {"attn_implementation": "eager", "experts_implementation": "eager"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {mt: save_tiny(mt, root / mt, seed=3) for mt in FAMILIES}


def _reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **EAGER)
    model.eval()
    return model


def _load_all(loader):
    model = loader.skeleton()
    loader.load_non_layer(model, "cpu")
    for i in range(loader.num_layers):
        loader.load_layer(model, i, "cpu")
    return model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layerwise_equals_from_pretrained(model_type, checkpoints):
    path = checkpoints[model_type]
    ref = _reference(path)
    loader = LayerwiseLoader(path, **EAGER)
    model = _load_all(loader)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for key in ref_sd:
        assert sd[key].dtype == ref_sd[key].dtype, key
        assert torch.equal(sd[key], ref_sd[key]), key
    # non-persistent buffers (rotary inv_freq, ...) are re-created, not left on meta
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        assert buf.device.type == "cpu", name
        torch.testing.assert_close(buf, ref_buffers[name], rtol=0, atol=0)
    assert loader.warnings == [] and loader.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_layer_in_memory_at_a_time(model_type, checkpoints):
    loader = LayerwiseLoader(checkpoints[model_type], **EAGER)
    model = loader.skeleton()
    path, layers = find_decoder_layers(model)
    assert path == loader.layers_path and len(layers) == loader.num_layers >= 2
    assert materialized_parameters(model) == []

    loader.load_non_layer(model, "cpu")
    assert materialized_parameters(layers) == []
    outside = set(materialized_parameters(model))
    assert outside and not any(n.startswith(path + ".") for n in outside)
    assert model.get_output_embeddings().weight.device.type == "cpu"

    for i in range(loader.num_layers):
        loader.load_layer(model, i, "cpu")
        names = materialized_parameters(layers)
        expected = {f"{i}.{n}" for n in list(dict(layers[i].named_parameters())) + list(dict(layers[i].named_buffers()))}
        assert set(names) == expected, f"layer {i}: other layers materialized"
        assert all(p.device.type == "cpu" for p in layers[i].parameters())
        refs = [weakref.ref(p) for p in layers[i].parameters()]
        loader.unload_layer(model, i)
        assert materialized_parameters(layers) == []
        gc.collect()
        assert all(r() is None for r in refs), "unloaded tensors are still referenced somewhere"
    assert set(materialized_parameters(model)) == outside


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streamed_forward_matches(model_type, checkpoints):
    """A forward that loads each layer just before it runs and frees it after gives the same logits."""
    path = checkpoints[model_type]
    loader = LayerwiseLoader(path, **EAGER)
    model = loader.skeleton()
    loader.load_non_layer(model, "cpu")
    layers = model.get_submodule(loader.layers_path)
    peak = 0

    def count(module, args, kwargs, output):
        nonlocal peak
        peak = max(peak, len({n.split(".")[0] for n in materialized_parameters(layers)}))

    handles = [layer.register_forward_hook(count, with_kwargs=True) for layer in layers]
    with loader.stream(model, "cpu"), torch.no_grad():
        logits = model(input_ids=IDS).logits
    for h in handles:
        h.remove()
    assert peak == 1  # never more than one decoder layer materialized
    assert materialized_parameters(layers) == []
    with torch.no_grad():
        torch.testing.assert_close(logits, _reference(path)(input_ids=IDS).logits, rtol=0, atol=0)


def test_reads_only_the_layers_tensors(checkpoints, monkeypatch):
    import safetensors

    path = checkpoints["mixtral"]
    loader = LayerwiseLoader(path, **EAGER)
    model = loader.skeleton()
    read: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, key):
            read.append(key)
            return self._f.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    loader.load_layer(model, 1, "cpu")
    assert sorted(read) == sorted(loader.layer_keys(1))
    assert read and all(k.startswith("model.layers.1.") for k in read)
    # on-disk names differ from runtime names: per-expert w1/w3 fuse into gate_up_proj
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in read
    assert loader.runtime_name("model.layers.1.block_sparse_moe.experts.0.w1.weight") == "model.layers.1.mlp.experts.gate_up_proj"
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8


def test_dtype_follows_the_skeleton(checkpoints):
    from transformers import AutoModelForCausalLM

    path = checkpoints["qwen3_moe"]
    loader = LayerwiseLoader(path, dtype=torch.bfloat16, **EAGER)
    model = _load_all(loader)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **EAGER)
    ref_sd = ref.state_dict()
    for key, value in model.state_dict().items():
        assert value.dtype == ref_sd[key].dtype and torch.equal(value, ref_sd[key]), key
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_tied_embeddings(checkpoints):
    path = checkpoints["ernie4_5_moe"]
    loader = LayerwiseLoader(path)
    model = loader.skeleton()
    assert model.config.tie_word_embeddings
    loader.load_non_layer(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in loader.checkpoint_keys()


def test_checkpoint_facts(checkpoints):
    path = checkpoints["dbrx"]
    loader = LayerwiseLoader(path)
    keys = loader.checkpoint_keys()
    assert keys and all(loader.shard_of(k) == path / "model.safetensors" for k in keys)
    loader.skeleton()
    assert loader.layers_path == "transformer.blocks"
    assert set(loader.non_layer_keys()) | {k for i in range(loader.num_layers) for k in loader.layer_keys(i)} == set(keys)
    assert "transformer.wte.weight" in loader.non_layer_keys()
    with pytest.raises(MoedslError, match="no tensor"):
        loader.shard_of("transformer.nope")
    with pytest.raises(MoedslError, match="out of range"):
        loader.layer_keys(loader.num_layers)


def test_sharded_checkpoint(tmp_path):
    from moedsl.models.tiny import build_model, tiny_config

    model = build_model(tiny_config("qwen3_moe"), "cpu", seed=5)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    loader = LayerwiseLoader(tmp_path, **EAGER)
    for key, shard in index["weight_map"].items():
        assert loader.shard_of(key) == tmp_path / shard
    loaded = _load_all(loader)
    ref = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)


def test_save_after_layerwise_load_writes_checkpoint_names(checkpoints, tmp_path):
    """save_pretrained of a layer-wise loaded model writes the on-disk names it was read from."""
    from safetensors import safe_open

    path = checkpoints["mixtral"]
    model = _load_all(LayerwiseLoader(path))
    model.save_pretrained(tmp_path)
    with safe_open(str(path / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def _drop_tensor(src, dst, drop: str):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_warns_or_fails_when_strict(checkpoints, tmp_path):
    _drop_tensor(checkpoints["qwen3_moe"], tmp_path / "m", "model.layers.1.input_layernorm.weight")
    loader = LayerwiseLoader(tmp_path / "m")
    model = loader.skeleton()
    loader.load_layer(model, 1, "cpu")
    assert any("model.layers.1.input_layernorm.weight" in w or "input_layernorm.weight" in w for w in loader.warnings)
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(64))  # the model's own init

    strict = LayerwiseLoader(tmp_path / "m", strict=True)
    with pytest.raises(MoedslError, match="input_layernorm.weight"):
        strict.load_layer(strict.skeleton(), 1, "cpu")


def test_bad_directories(tmp_path):
    with pytest.raises(MoedslError, match="does not exist"):
        LayerwiseLoader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoedslError, match="config.json"):
        LayerwiseLoader(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (tmp_path / "noweights" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MoedslError, match="safetensors") as err:
        LayerwiseLoader(tmp_path / "noweights")
    assert "pytorch_model.bin" in str(err.value)
    (tmp_path / "badshard").mkdir()
    (tmp_path / "badshard" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (tmp_path / "badshard" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MoedslError, match="model.safetensors"):
        LayerwiseLoader(tmp_path / "badshard")
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (tmp_path / "badindex" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(MoedslError, match="model-00001-of-00002.safetensors"):
        LayerwiseLoader(tmp_path / "badindex")


def test_shape_mismatch_is_a_moedsl_error(checkpoints, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(checkpoints["qwen3_moe"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 40  # the checkpoint has 32
    (path / "config.json").write_text(json.dumps(cfg))
    loader = LayerwiseLoader(path)
    with pytest.raises(MoedslError, match="shape"):
        loader.load_layer(loader.skeleton(), 1, "cpu")
