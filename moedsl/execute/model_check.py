"""Pre-flight checks of a model directory, before any model is built or any output is touched.

`check_config` reads config.json as JSON and refuses values no model can have (a negative
`hidden_size`, more experts per token than experts, a `pad_token_id` outside the vocabulary …),
naming the file, the line:col of the key and the value. `check_layer_count` compares
`num_hidden_layers` with the decoder layers the checkpoint holds, so that a config claiming 10⁶
layers is refused at once instead of building a skeleton for ever. `check_fit` runs once the
skeleton exists: every checkpoint tensor must load into a parameter of the same shape, and every
parameter must come from the checkpoint, unless the user relaxes that explicitly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from moedsl.errors import MoedslError, Span

# config key -> smallest valid value (sizes are >= 1; counts of optional parts may be 0)
_SIZES = {
    "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1, "vocab_size": 1,
    "max_position_embeddings": 1, "num_experts": 0, "num_local_experts": 0, "n_routed_experts": 0,
    "num_experts_per_tok": 1, "moe_topk": 1, "n_shared_experts": 0, "shared_expert_intermediate_size": 0,
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "n_group": 1, "topk_group": 1,
}
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)\.")


class _Config:
    """config.json's text and object, for errors that point at a key."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise MoedslError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise MoedslError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            self.data = json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise MoedslError(f"not valid JSON: {exc.msg}", span=Span(str(path), exc.lineno, exc.colno, 1, self.text),
                              notes=["config.json is written by save_pretrained"]) from None
        except (RecursionError, ValueError) as exc:
            raise MoedslError(f"{path}: not a usable JSON config ({type(exc).__name__})") from None
        if not isinstance(self.data, dict):
            raise MoedslError(f"{path}: a config is a JSON object, not {type(self.data).__name__}")

    def span(self, key: str, within: str | None = None) -> Span:
        start = self.text.find(f'"{within}"') if within else 0
        pos = self.text.find(f'"{key}"', max(start, 0))
        if pos < 0:
            return Span(str(self.path), 1, 1, 1, self.text)
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return Span(str(self.path), line, col, len(key) + 2, self.text)

    def error(self, key: str, message: str, within: str | None = None, **kw) -> MoedslError:
        return MoedslError(message, span=self.span(key, within), **kw)


def _holders(cfg: _Config) -> list[tuple[dict, str | None]]:
    """The config and its language-model sub-config (composite models), with the sub-config's key."""
    out: list[tuple[dict, str | None]] = [(cfg.data, None)]
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.data.get(sub), dict):
            out.append((cfg.data[sub], sub))
    return out


def check_config(model_dir: Path) -> dict:
    """Refuse config.json values no model can have; returns the parsed config."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise MoedslError(f"{model_dir}: no config.json (not a transformers model directory)",
                          notes=["save the model with `save_pretrained`"])
    cfg = _Config(path)
    if not isinstance(cfg.data.get("model_type"), str):
        raise cfg.error("model_type", "config.json names no `model_type` (a string such as \"qwen3_moe\")")
    for holder, within in _holders(cfg):
        where = f"{within}.{{}}" if within else "{}"
        for key, low in _SIZES.items():
            if key not in holder or holder[key] is None:
                continue
            v = holder[key]
            if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                v = min(v)  # one size per modality (ERNIE-4.5-VL's text and vision experts)
            if isinstance(v, bool) or not isinstance(v, int):
                raise cfg.error(key, f"`{where.format(key)}` is {json.dumps(v)[:40]}; it must be an integer",
                                within)
            if v < low:
                need = "a positive integer" if low == 1 else "an integer >= 0"
                raise cfg.error(key, f"`{where.format(key)}` is {v}; it must be {need}", within)
        experts = next((holder[k] for k in _EXPERT_COUNTS if isinstance(holder.get(k), int)), None)
        for key in _TOP_K:
            k = holder.get(key)
            if isinstance(k, int) and experts and k > experts:
                raise cfg.error(key, f"`{where.format(key)}` is {k}, more than the {experts} experts "
                                     "(each token picks its top-k among the experts)", within)
        vocab = holder.get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            for key in _TOKEN_IDS:
                ids = holder.get(key)
                for t in ids if isinstance(ids, list) else [ids]:
                    if isinstance(t, int) and not isinstance(t, bool) and not 0 <= t < vocab:
                        raise cfg.error(key, f"`{where.format(key)}` is {t}, outside the vocabulary "
                                             f"(vocab_size {vocab}: ids 0..{vocab - 1})", within)
    return cfg.data


def checkpoint_layer_counts(keys) -> dict[str, int]:
    """prefix -> number of indexed blocks under it (`model.layers` -> 48), from checkpoint key names."""
    seen: dict[str, set[int]] = {}
    for key in keys:
        m = _LAYER_INDEX.match(key)  # the first `.N.` segment of the key
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {prefix: max(idx) + 1 for prefix, idx in seen.items()}


def check_layer_count(model_dir: Path, config: dict, keys) -> None:
    """A config with more decoder layers than any stack of layers in the checkpoint is refused before the
    model is built (it would be quantized with made-up layers, and 10⁶ layers never finish building)."""
    cfg = _Config(model_dir / "config.json")
    for holder, within in _holders(cfg):
        n = holder.get("num_hidden_layers")
        if not isinstance(n, int):
            continue
        counts = checkpoint_layer_counts(keys)
        if not counts:
            return
        prefix, most = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))
        if n > most:
            name = f"{within}.num_hidden_layers" if within else "num_hidden_layers"
            raise cfg.error("num_hidden_layers", f"`{name}` is {n}, but the checkpoint holds {most} layers "
                            f"({prefix}.0 .. {prefix}.{most - 1}); {prefix}.{most} and later are missing",
                            within, notes=["the config does not belong to these weights"])


def _ignored(model, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or [])]


def check_fit(loader, model, *, allow_missing: bool, allow_unused: bool) -> list[str]:
    """After the skeleton is built: every checkpoint tensor loads into a parameter, directly loaded tensors
    have that parameter's shape, and every parameter comes from the checkpoint. Returns the warnings for what
    the options allowed; raises a `MoedslError` naming the keys otherwise."""
    warnings: list[str] = []
    d = loader.model_dir
    ignore_unused = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    unused = [k for k in loader.unexpected_keys if not any(p.search(k) for p in ignore_unused)]
    if unused:
        msg = (f"{len(unused)} checkpoint tensor(s) match no parameter of {type(model).__name__} "
               f"({model.config.model_type}): {_listing(unused)}")
        notes = []
        beyond = _layers_beyond(unused, loader.layers_path, loader.num_layers)
        if beyond:
            notes.append(f"config.json says num_hidden_layers = {loader.num_layers}, but the checkpoint also holds "
                         f"{loader.layers_path}.{beyond[0]} .. {loader.layers_path}.{beyond[-1]}")
        if not allow_unused:
            raise MoedslError(f"{d}: {msg}", notes=notes + ["the config does not describe these weights; pass "
                                                            "--allow-unused-weights to ignore them"])
        msg += "".join(f"; {n}" for n in notes)
        warnings.append(f"{d}: ignored (--allow-unused-weights): {msg}")

    meta_sd = model.state_dict(keep_vars=True)
    covered: set[str] = set()
    bad_shape: list[str] = []
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = {}
    unexpected = set(loader.unexpected_keys)
    for key in loader.checkpoint_keys():
        if key in unexpected:
            continue
        covered.add(loader.runtime_name(key))
        if loader.stored_keys(key) == (key,):  # FP8/MXFP4 tensors: their stored parts are checked by the reader
            by_shard.setdefault(loader.shard_of(key), []).append(key)
    header: dict[str, tuple[tuple[int, ...], str]] = {}  # key -> (shape, dtype), from the shard headers only
    for shard, keys in by_shard.items():
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in keys:
                    sl = f.get_slice(key)
                    header[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except Exception as exc:  # safetensors raises its own error types
            raise MoedslError(f"{shard}: not a readable safetensors file: {exc}") from None
    fused: dict[str, list[str]] = {}
    for key, (got, _) in header.items():
        runtime = loader.runtime_name(key)
        if loader.is_converted(key):  # fused or split on the way in: compared in total below
            fused.setdefault(runtime, []).append(key)
        elif got != tuple(meta_sd[runtime].shape):  # loaded as is (perhaps renamed): shapes must be equal
            bad_shape.append(f"`{key}`: checkpoint shape {list(got)}, the model expects "
                             f"{list(meta_sd[runtime].shape)}")
    # A one-to-many converter (ERNIE-4.5-VL: one expert tensor → the text and the vision experts) is named by
    # its first target alone: its keys fill the other targets too, so they cover those and no per-target
    # element count holds for them.
    split = [targets for conv in getattr(loader, "_mapping", None) or ()
             if len(targets := [str(t).replace("\\.", ".") for t in (getattr(conv, "target_patterns", None) or ())]) > 1]
    for runtime, keys in fused.items():
        # a converter that stacks or concatenates keeps the element count; one that dequantizes does not
        if any(not header[k][1].startswith(("F16", "BF16", "F32", "F64")) or "scale" in k for k in keys):
            continue
        if any(targets[0] in runtime for targets in split):
            continue
        got = sum(math.prod(header[k][0]) for k in keys)
        want = meta_sd[runtime].numel()
        if got != want:
            bad_shape.append(f"`{runtime}` is made of {len(keys)} checkpoint tensors ({_listing(keys, 3)}) with "
                             f"{got} values in all; the model expects {list(meta_sd[runtime].shape)} = {want}")
    if bad_shape:
        raise MoedslError(f"{d}: {len(bad_shape)} checkpoint tensor(s) do not fit {type(model).__name__} "
                          f"({model.config.model_type})", notes=bad_shape[:12] + (
                              [f"… and {len(bad_shape) - 12} more"] if len(bad_shape) > 12 else [])
                          + ["the config does not describe these weights"])

    for targets in split:
        for name in list(covered):
            if targets[0] in name:
                covered |= {name.replace(targets[0], t, 1) for t in targets[1:]}
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    ignore_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    persistent = {n for n, _ in model.named_parameters()} | _persistent_buffers(model)
    missing = [n for n in meta_sd if n in persistent and n not in covered and n not in tied
               and not any(p.search(n) for p in ignore_missing)]
    if missing:
        msg = (f"{len(missing)} parameter(s) of {type(model).__name__} are not in the checkpoint: "
               f"{_listing(missing)}")
        if not allow_missing:
            raise MoedslError(f"{d}: {msg}", notes=["pass --allow-missing-weights to initialize them as "
                                                    "from_pretrained would (random weights)"])
        warnings.append(f"{d}: initialized as from_pretrained would (--allow-missing-weights): {msg}")
    return warnings


def _layers_beyond(keys: list[str], layers_path: str, n: int) -> list[int]:
    """Indices >= n of decoder layers that `keys` belong to (a config with fewer layers than its checkpoint)."""
    pat = re.compile(rf"(?:^|\.){re.escape(layers_path.split('.')[-1])}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.search(k)) and int(m.group(1)) >= n})


def _persistent_buffers(model) -> set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        for b in mod._buffers:
            if b not in mod._non_persistent_buffers_set:
                out.add(f"{mod_name}.{b}" if mod_name else b)
    return out


def _listing(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def open_model(model_dir: Path, opts, device) -> tuple:
    """The checked model directory as (loader, skeleton on the meta device, warnings): config values, layer
    count and the checkpoint's fit are checked before anything is quantized or written."""
    from moedsl.execute.loader import LayerwiseLoader
    from moedsl.execute.option_check import check_token_memory

    model_dir = Path(model_dir)
    config = check_config(model_dir)
    loader = LayerwiseLoader(model_dir, strict=not opts.allow_missing_weights,
                             trust_remote_code=getattr(opts, "trust_remote_code", False))
    check_layer_count(model_dir, config, loader.checkpoint_keys())
    hidden = next((h.get("hidden_size") for h in (config, config.get("text_config") or {})
                   if isinstance(h, dict) and isinstance(h.get("hidden_size"), int)), None)
    if hidden:
        check_token_memory(opts, hidden)
    model = loader.skeleton()
    model.eval()
    warnings = check_fit(loader, model, allow_missing=opts.allow_missing_weights,
                         allow_unused=opts.allow_unused_weights)
    return loader, model, warnings
