"""Bad model directories: damaged shards and indexes, configs that do not fit the checkpoint,
impossible config values, NaN/Inf weights."""

from __future__ import annotations

import json

import torch

from tests.adversarial.case import Case, DELETE, edit_config, edit_tensors, either, error, ok, quantize, report_of

EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"
ATTN = "model.layers.0.self_attn.q_proj.weight"


def _model(ws, **cfg):
    m = ws.model()
    if cfg:
        edit_config(m, **cfg)
    return m


def _shard(ws, how):
    m = ws.model()
    shard = m / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(how(data))
    return quantize(ws, m)


def _index(ws, weight_map_fn, text=None):
    m = ws.model()
    from safetensors import safe_open

    with safe_open(str(m / "model.safetensors"), "pt") as f:
        wm = {k: "model.safetensors" for k in f.keys()}
    body = text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map_fn(wm)})
    (m / "model.safetensors.index.json").write_text(body)
    return quantize(ws, m)


def _tensors(ws, fn, *extra):
    m = ws.model()
    edit_tensors(m, fn)
    return quantize(ws, m, *extra)


def _poison(key, value):
    def fn(t):
        w = t[key].clone()
        w.view(-1)[5] = value
        t[key] = w
        return t
    return fn


def _drop(key):
    def fn(t):
        del t[key]
        return t
    return fn


def _reshape(key, shape):
    def fn(t):
        t[key] = torch.zeros(shape)
        return t
    return fn


def _add(key, shape):
    def fn(t):
        t[key] = torch.zeros(shape)
        return t
    return fn


def _warned(ws, res):
    w = report_of(ws)["warnings"]
    return [] if any("not in the checkpoint" in x or "missing" in x for x in w) else [f"report warnings: {w}"]


def _report_warnings_nonempty(ws, res):
    return [] if report_of(ws)["warnings"] else ["the report lists no warnings"]


CASES = [
    Case("baseline-qwen3", "model-dir", lambda ws: quantize(ws, ws.model()), ok(), fresh=True),
    Case("baseline-mixtral", "model-dir", lambda ws: quantize(ws, ws.model("mixtral")), ok()),
    Case("baseline-default-model", "model-dir", lambda ws: quantize(ws, None), ok(), fresh=True),
    # damaged files
    Case("shard-truncated", "model-dir", lambda ws: _shard(ws, lambda d: d[: len(d) // 2]),
         error("model.safetensors")),
    Case("shard-garbage", "model-dir", lambda ws: _shard(ws, lambda d: bytes(range(256)) * 40),
         error("model.safetensors")),
    Case("shard-zero-length", "model-dir", lambda ws: _shard(ws, lambda d: b""), error("model.safetensors")),
    Case("shard-header-only", "model-dir", lambda ws: _shard(ws, lambda d: d[: 8 + int.from_bytes(d[:8], "little")]),
         error("model.safetensors")),
    Case("shard-last-byte-gone", "model-dir", lambda ws: _shard(ws, lambda d: d[:-1]), error("model.safetensors")),
    Case("index-key-missing-from-shard", "model-dir",
         lambda ws: _index(ws, lambda wm: {**wm, "model.layers.1.mlp.experts.9.up_proj.weight": "model.safetensors"}),
         error("model.layers.1.mlp.experts.9.up_proj.weight")),
    Case("index-names-missing-shard", "model-dir",
         lambda ws: _index(ws, lambda wm: {**wm, ATTN: "model-00002-of-00002.safetensors"}),
         error("model-00002-of-00002.safetensors")),
    Case("index-not-json", "model-dir", lambda ws: _index(ws, None, text="{not json"),
         error("model.safetensors.index.json")),
    Case("index-weight-map-list", "model-dir", lambda ws: _index(ws, None, text='{"weight_map": [1, 2]}'),
         error("model.safetensors.index.json")),
    Case("index-shard-escapes-dir", "model-dir",
         lambda ws: _index(ws, lambda wm: {**wm, ATTN: "../../../etc/passwd"}),
         error("model.safetensors.index.json")),
    Case("config-missing", "model-dir", lambda ws: quantize(ws, _del_config(ws)), error("config.json"), fresh=True),
    Case("config-not-json", "model-dir", lambda ws: quantize(ws, _write_config(ws, "{'model_type': 1")),
         error("config.json")),
    Case("config-empty", "model-dir", lambda ws: quantize(ws, _write_config(ws, "")), error("config.json")),
    Case("config-a-list", "model-dir", lambda ws: quantize(ws, _write_config(ws, "[1, 2]")), error("config.json")),
    Case("config-unknown-model-type", "model-dir", lambda ws: quantize(ws, _model(ws, model_type="qwen9_moe")),
         error("config.json", "qwen9_moe")),
    Case("config-no-model-type", "model-dir", lambda ws: quantize(ws, _model(ws, model_type=DELETE)),
         error("config.json")),
    Case("model-dir-missing", "model-dir", lambda ws: quantize(ws, ws.root / "nope"), error("nope")),
    Case("model-dir-is-file", "model-dir", lambda ws: quantize(ws, ws.file("model.txt", "hello")),
         error("model.txt")),
    Case("only-bin-weights", "model-dir", lambda ws: quantize(ws, _bin_only(ws)), error("safetensors")),
    # configs that do not fit the checkpoint
    Case("mixtral-config-on-qwen3-weights", "model-dir",
         lambda ws: quantize(ws, _model(ws, model_type="mixtral", architectures=["MixtralForCausalLM"])),
         error("match no parameter", "MixtralForCausalLM")),
    Case("more-layers-than-checkpoint", "model-dir", lambda ws: quantize(ws, _model(ws, num_hidden_layers=3)),
         error("num_hidden_layers", "model.layers.2")),
    Case("fewer-layers-than-checkpoint", "model-dir", lambda ws: quantize(ws, _model(ws, num_hidden_layers=1)),
         error("num_hidden_layers", "model.layers.1")),
    Case("million-layers", "model-dir", lambda ws: quantize(ws, _model(ws, num_hidden_layers=10**6)),
         error("num_hidden_layers", "1000000"), timeout=180),
    Case("fewer-experts-than-checkpoint", "model-dir", lambda ws: quantize(ws, _model(ws, num_experts=4, num_local_experts=4)),
         error("model.layers.1.mlp.experts.gate_up_proj", "do not fit")),
    Case("wider-hidden-than-checkpoint", "model-dir", lambda ws: quantize(ws, _model(ws, hidden_size=128)),
         error("model.embed_tokens.weight")),
    Case("tensor-missing", "model-dir", lambda ws: _tensors(ws, _drop(ATTN)), error(ATTN, "--allow-missing-weights")),
    Case("tensor-missing-allowed", "model-dir", lambda ws: _tensors(ws, _drop(ATTN), "--allow-missing-weights"),
         ok(), check=_warned),
    Case("tensor-unused", "model-dir", lambda ws: _tensors(ws, _add("model.layers.0.mlp.extra.weight", (4, 4))),
         error("model.layers.0.mlp.extra.weight")),
    Case("tensor-unused-allowed", "model-dir",
         lambda ws: _tensors(ws, _add("model.layers.0.mlp.extra.weight", (4, 4)), "--allow-unused-weights"),
         ok(), check=_report_warnings_nonempty),
    Case("tensor-wrong-shape", "model-dir", lambda ws: _tensors(ws, _reshape(ATTN, (64, 48))), error(ATTN)),
    Case("expert-wrong-shape", "model-dir", lambda ws: _tensors(ws, _reshape(EXPERT, (16, 64))), error("experts")),
    # impossible config values
    Case("topk-above-experts", "model-dir", lambda ws: quantize(ws, _model(ws, num_experts_per_tok=99)),
         error("num_experts_per_tok", "99")),
    Case("topk-zero", "model-dir", lambda ws: quantize(ws, _model(ws, num_experts_per_tok=0)),
         error("num_experts_per_tok")),
    Case("pad-token-above-vocab", "model-dir", lambda ws: quantize(ws, _model(ws, pad_token_id=1000)),
         error("pad_token_id", "1000")),
    Case("hidden-size-negative", "model-dir", lambda ws: quantize(ws, _model(ws, hidden_size=-64)),
         error("hidden_size", "-64")),
    Case("vocab-size-zero", "model-dir", lambda ws: quantize(ws, _model(ws, vocab_size=0)), error("vocab_size")),
    Case("heads-zero", "model-dir", lambda ws: quantize(ws, _model(ws, num_attention_heads=0)),
         error("num_attention_heads")),
    Case("hidden-size-string", "model-dir", lambda ws: quantize(ws, _model(ws, hidden_size="64")),
         error("hidden_size")),
    Case("layers-float", "model-dir", lambda ws: quantize(ws, _model(ws, num_hidden_layers=2.5)),
         error("num_hidden_layers")),
    # non-finite weights
    Case("nan-in-expert", "model-dir", lambda ws: _tensors(ws, _poison(EXPERT, float("nan"))),
         error("layer 1", "expert 3", "gate")),
    Case("inf-in-attention", "model-dir", lambda ws: _tensors(ws, _poison(ATTN, float("inf"))),
         error("layer 0", "q_proj")),
    Case("symlinked-model-dir", "model-dir", lambda ws: quantize(ws, _symlinked(ws)), ok()),
]


def _del_config(ws):
    m = ws.model()
    (m / "config.json").unlink()
    return m


def _write_config(ws, text):
    m = ws.model()
    (m / "config.json").write_text(text)
    return m


def _bin_only(ws):
    m = ws.model()
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return m


def _symlinked(ws):
    m = ws.model()
    link = ws.root / "link"
    link.symlink_to(m, target_is_directory=True)
    return link
