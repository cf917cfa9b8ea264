"""Layer-by-layer loading of a safetensors checkpoint into a meta-device model.

The executor keeps peak host memory near "one decoder layer + embeddings + head": the model is
built on the meta device (`skeleton`), the parts outside the decoder layers are materialized
once (`load_non_layer`), and each decoder layer is materialized from the shards only while it is
worked on (`load_layer` / `unload_layer`). Only the tensors that belong to that layer are read
(`safe_open` slices, nothing else is touched).

Checkpoint names are not runtime names: transformers 5.x fuses per-expert tensors at load time
(`mlp.experts.{e}.gate_proj.weight` + `up_proj` -> `mlp.experts.gate_up_proj`; Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2`; phimoe's gate -> router; granitemoe's
`input_linear`; ...). This module does not know any of those renames: it asks transformers for
the model's own conversion list (`conversion_mapping.get_model_conversion_mapping`), uses it to
decide which checkpoint keys belong to which layer (`core_model_loading.rename_source_key`), and
lets transformers apply it (`core_model_loading.convert_and_load_state_dict_in_model`), exactly as
`from_pretrained` does. Tensors that are not in the checkpoint (rotary `inv_freq`, other
non-persistent buffers, tied weights) are re-created the way `from_pretrained` does: materialized
on the device, then initialized by the model's own `_init_weights`, and tied with `tie_weights`.

Checkpoints stored as FP8 (block-scaled) or MXFP4 are read by logical name, the name a bf16
checkpoint would have: each layer's stored tensors are brought to the device and dequantized there
as the layer loads (`moedsl/execute/dequant.py`), before transformers' conversion sees them; the
scales are consumed with their weights. The skeleton is built without the source's
`quantization_config`, so transformers never swaps in its own FP8/MXFP4 modules.

Works with transformers 5.17 through 5.24 (the functions used exist with the same signatures in
both; see `_transformers_api`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moedsl.errors import MoedslError
from moedsl.execute import dequant
from moedsl.execute.dequant import StoredFormat
from moedsl.models.tiny import quiet_transformers

__all__ = ["LayerwiseLoader", "checkpoint_parts", "find_decoder_layers", "materialized_parameters", "stored_format"]

log = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"


def _natural_key(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _transformers_api():
    """The transformers loading internals this module relies on (present in 5.17 .. 5.24)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            convert_and_load_state_dict_in_model,
            rename_source_key,
        )
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError as exc:  # pragma: no cover - only on an unsupported transformers
        import transformers

        raise MoedslError(
            f"transformers {transformers.__version__} lacks the checkpoint-conversion API moedsl uses "
            f"({exc}); moedsl needs transformers >= 5.17"
        ) from None
    return {
        "get_model_conversion_mapping": get_model_conversion_mapping,
        "WeightConverter": WeightConverter,
        "WeightRenaming": WeightRenaming,
        "convert_and_load": convert_and_load_state_dict_in_model,
        "rename_source_key": rename_source_key,
        "LoadStateDictConfig": LoadStateDictConfig,
    }


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer container of a causal LM: (path, ModuleList).

    Prefers a ModuleList whose entries are the model's `_no_split_modules` classes (the decoder
    layer classes); otherwise the longest ModuleList of modules named like layers/blocks.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m).__name__ for m in module}
        if no_split and classes <= no_split:
            rank = 0
        elif all(re.search(r"(Layer|Block)$", c) for c in classes):
            rank = 1
        else:
            continue
        candidates.append((rank, -len(module), name, module))
    if not candidates:
        raise MoedslError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of layers")
    candidates.sort(key=lambda c: (c[0], c[1], len(c[2])))
    _, _, name, module = candidates[0]
    return name, module


def materialized_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` that hold real storage (not on meta)."""
    out = [n for n, p in module.named_parameters() if p.device.type != "meta"]
    out += [n for n, b in module.named_buffers() if b is not None and b.device.type != "meta"]
    return out


def shard_map(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key → the safetensors shard holding it (from the index, else from every shard)."""
    index = model_dir / _INDEX_FILE
    shard_of: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise MoedslError(f"{index}: not a safetensors index (needs a `weight_map` object): {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MoedslError(f"{index}: `weight_map` must be an object of tensor name -> shard file name")
        root = model_dir.resolve()
        paths: dict[str, Path] = {}  # a few shards for thousands of keys: each is checked once
        for key, shard in weight_map.items():
            path = paths.get(shard)
            if path is None:
                path = model_dir / shard
                if root not in path.resolve().parents:
                    raise MoedslError(f"{index}: `{key}` is in shard {shard!r}, which is not a file inside {model_dir}")
                if not path.is_file():
                    raise MoedslError(f"{index}: `{key}` is in shard {shard}, which does not exist in {model_dir}")
                paths[shard] = path
            shard_of[key] = path
        _check_index_keys(index, shard_of)
        return shard_of
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in model_dir.glob("*.bin"))
        notes = [f"found {', '.join(found)}: convert the checkpoint to safetensors"] if found else []
        raise MoedslError(f"{model_dir}: no *.safetensors weights", notes=notes)
    from safetensors import safe_open

    for path in shards:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shard_of.setdefault(key, path)
        except Exception as exc:  # safetensors raises its own error types
            raise MoedslError(f"{path}: not a readable safetensors file: {exc}") from None
    return shard_of


def stored_format(model_dir: Path) -> StoredFormat:
    """How the checkpoint in `model_dir` stores its weights, from its config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoedslError(f"{model_dir}: no config.json (not a transformers model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoedslError(f"{path}: not a JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise MoedslError(f"{path}: not a JSON object")
    return StoredFormat.of_config(config, str(path))


def checkpoint_parts(model_dir: Path, shards: dict[str, Path] | None = None) -> dict[str, tuple[str, ...]]:
    """Logical checkpoint name (what a bf16 checkpoint would call it) → the stored tensors it is read
    from: itself, or an FP8 weight and its `weight_scale_inv`, or MXFP4 `_blocks` and `_scales`."""
    model_dir = Path(model_dir)
    return dequant.group(shards if shards is not None else shard_map(model_dir), stored_format(model_dir),
                         str(model_dir))


def _check_index_keys(index: Path, shard_of: dict[str, Path]) -> None:
    """Every tensor the index names must be in its shard (reads only the shards' headers)."""
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = defaultdict(list)
    for key, path in shard_of.items():
        by_shard[path].append(key)
    for path, keys in sorted(by_shard.items()):
        try:
            with safe_open(str(path), framework="pt") as f:
                have = set(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise MoedslError(f"{path}: not a readable safetensors file: {exc}") from None
        absent = sorted(set(keys) - have, key=_natural_key)
        if absent:
            raise MoedslError(f"{index}: {len(absent)} tensor(s) listed for {path.name} are not in it: "
                              + ", ".join(absent[:6]) + (f" and {len(absent) - 6} more" if len(absent) > 6 else ""),
                              notes=["the index does not belong to these shards (an interrupted download?)"])


@dataclass(frozen=True)
class StoredParts:
    """A checkpoint tensor stored quantized (FP8 and its block scales, MXFP4 blocks and scales), as read
    ahead into host memory: its stored tensors by stored name. `load_layer` dequantizes them on the device."""

    tensors: dict[str, torch.Tensor]


class LayerwiseLoader:
    """Load a safetensors checkpoint directory layer by layer into a meta-device model.

    >>> loader = LayerwiseLoader(model_dir)
    >>> model = loader.skeleton()               # everything on meta
    >>> loader.load_non_layer(model, "cuda")    # embeddings, final norm, lm_head, rotary buffers
    >>> for i in range(loader.num_layers):
    ...     loader.load_layer(model, i, "cuda")
    ...     ...                                 # work on model.<layers>[i]
    ...     loader.unload_layer(model, i)

    `strict=True` makes a checkpoint that lacks a parameter an error; by default the parameter is
    initialized as `from_pretrained` would and a note is added to `warnings`. `trust_remote_code`
    lets the directory's own code (config.json's `auto_map`) define the classes, as in
    transformers; without it such a directory is refused (`remote_code` lists the files run).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        experts_implementation: str | None = None,
        strict: bool = False,
        trust_remote_code: bool = False,
        layers_path: str | None = None,
    ):
        """layers_path: the decoder-layer ModuleList (the definition's `layers`); found by
        `find_decoder_layers` when not given — a composite model needs it, its towers have layers too."""
        self.model_dir = Path(model_dir)
        self._given_layers_path = layers_path
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.experts_implementation = experts_implementation
        self.strict = strict
        self.warnings: list[str] = []
        if not self.model_dir.is_dir():
            raise MoedslError(f"model directory {self.model_dir} does not exist")
        if not (self.model_dir / "config.json").is_file():
            raise MoedslError(
                f"{self.model_dir}: no config.json (not a transformers model directory)",
                notes=["save the model with `save_pretrained`"],
            )
        from moedsl.models import remote

        # the directory's own code (auto_map): refused here without trust_remote_code, else checked
        self.remote_code = remote.policy(self.model_dir / "config.json", trust_remote_code)
        self._shard_of: dict[str, Path] = self._read_index()  # stored name -> shard
        self.stored_format = stored_format(self.model_dir)
        self._parts = checkpoint_parts(self.model_dir, self._shard_of)  # logical name -> stored names
        self._keys = sorted(self._parts, key=_natural_key)  # asked for several times; thousands of keys
        self._config = None
        # filled by skeleton(): checkpoint key -> runtime key, plan per layer
        self._mapping = None
        self._runtime_of: dict[str, str] = {}
        self._also_runtime_of: dict[str, list[str]] = {}  # the further targets of a key a converter splits
        self._layer_keys: dict[int | None, list[str]] = {}
        self._unexpected: list[str] = []
        self._converted: set[str] = set()
        self._conversion_of: dict[str, int] = {}  # converted key -> its conversion (keys converted together)
        self._layers_path: str | None = None
        self._planned_for: int | None = None

    # ------------------------------------------------------------------ checkpoint files

    def _read_index(self) -> dict[str, Path]:
        return shard_map(self.model_dir)

    def checkpoint_keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in natural order: on-disk names, except that an FP8
        weight and its scale, or MXFP4 blocks and scales, are one name (the bf16 checkpoint's)."""
        return list(self._keys)

    def stored_keys(self, key: str) -> tuple[str, ...]:
        """The on-disk tensors checkpoint tensor `key` is read from."""
        try:
            return self._parts[key]
        except KeyError:
            from moedsl.errors import nearest

            raise MoedslError(
                f"{self.model_dir}: no tensor `{key}` in the checkpoint", suggestion=nearest(key, self._parts)
            ) from None

    def shard_of(self, key: str) -> Path:
        """The shard file holding checkpoint tensor `key` (its weight, for a stored-quantized one)."""
        return self._shard_of[self.stored_keys(key)[0]]

    @contextlib.contextmanager
    def _reader(self, device):
        """get(key) → the checkpoint tensor `key`: a lazy safetensors slice, or for an FP8/MXFP4 one its
        dequantized tensor on `device`. Shards are opened once each, closed on exit."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def stored(name: str):
                shard = self._shard_of[name]
                if shard not in handles:
                    handles[shard] = stack.enter_context(safe_open(str(shard), framework="pt", device="cpu"))
                return handles[shard].get_slice(name)

            def get(key: str):
                return dequant.read(key, self.stored_keys(key), stored, self.stored_format, device,
                                    str(self.model_dir))

            yield get

    def read_tensors(self, keys: list[str], device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for each checkpoint tensor in `keys`, as a bf16 checkpoint would hold it
        (dequantized on `device` where stored as FP8/MXFP4), in shard order."""
        with self._reader(torch.device(device)) as get:
            for key in sorted(keys, key=lambda k: (str(self.shard_of(k)), _natural_key(k))):
                t = get(key)
                yield key, (t if torch.is_tensor(t) else t[...]).to(device)

    # ------------------------------------------------------------------ model skeleton

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            from moedsl.models import remote

            try:
                with remote.running(self.remote_code, "loading the config"), quiet_transformers():
                    self._config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True,
                                                              trust_remote_code=self.remote_code is not None)
            except MoedslError:
                raise
            except Exception as exc:
                raise MoedslError(f"{self.model_dir / 'config.json'}: cannot read the config: {exc}") from None
            # how the source stores its weights is this loader's business (it dequantizes); with it
            # in the config, transformers would build its own FP8/MXFP4 modules instead of Linears
            if hasattr(self._config, "quantization_config"):
                del self._config.quantization_config
        return self._config

    def skeleton(self) -> nn.Module:
        """The model of this directory's config.json, built on the meta device (no storage)."""
        from moedsl.models import remote
        from moedsl.models.tiny import _instantiate, model_class

        kwargs = {"trust_remote_code": True} if self.remote_code is not None else {}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.experts_implementation is not None:
            kwargs["experts_implementation"] = self.experts_implementation
        try:
            cls = model_class(self.config, self.remote_code is not None)
            with remote.running(self.remote_code, "building the model"), quiet_transformers(), torch.device("meta"):
                model = _instantiate(cls, self.config, **kwargs)
        except Exception as exc:  # transformers and torch refuse impossible configs with many error types
            raise MoedslError(
                f"{self.model_dir / 'config.json'}: cannot build a causal LM for model_type "
                f"`{getattr(self.config, 'model_type', '?')}`: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        model.eval()
        self._plan(model)
        return model

    def _plan(self, model: nn.Module) -> None:
        """Map every checkpoint key to its runtime name and its layer (None = outside the layers)."""
        api = _transformers_api()
        if self._given_layers_path is not None:
            self._layers_path, layers = self._given_layers_path, model.get_submodule(self._given_layers_path)
        else:
            self._layers_path, layers = find_decoder_layers(model)
        self._num_layers = len(layers)
        with quiet_transformers():
            mapping = api["get_model_conversion_mapping"](model)
        renamings = [m for m in mapping if isinstance(m, api["WeightRenaming"])]
        converters = [m for m in mapping if isinstance(m, api["WeightConverter"])]
        meta_sd = model.state_dict()
        prefix = model.base_model_prefix
        layer_re = re.compile(rf"^{re.escape(self._layers_path)}\.(\d+)\.")
        runtime_of: dict[str, str] = {}
        also_runtime_of: dict[str, list[str]] = {}
        per_layer: dict[int | None, list[str]] = defaultdict(list)
        unexpected: list[str] = []
        converted: set[str] = set()
        # the renaming answers with the source pattern that matched; the keys of one conversion are those
        # matched by any of its converter's patterns
        owner = {pattern: index for index, c in enumerate(converters) for pattern in c.source_patterns}
        conversion_of: dict[str, int] = {}
        for key in self.checkpoint_keys():
            # the same two-step renaming that convert_and_load_state_dict_in_model performs
            renamed, pattern = api["rename_source_key"](key, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                renamed, pattern = api["rename_source_key"](key, [], [], prefix, meta_sd)
            if renamed not in meta_sd:
                unexpected.append(key)
                continue
            runtime_of[key] = renamed
            if pattern is not None:
                converted.add(key)
                conversion_of[key] = owner.get(pattern, -1)
                # a one-to-many converter (Kimi-K2.5's vision `wqkv` -> attn.q_proj, k_proj, v_proj) renames
                # into its first target; the others are the same key with the first target's name replaced
                targets = list(converters[owner[pattern]].target_patterns) if pattern in owner else []
                others = [renamed.replace(targets[0], t, 1) for t in targets[1:] if targets[0] in renamed]
                if others and all(o in meta_sd for o in others):
                    also_runtime_of[key] = others
            m = layer_re.match(renamed)
            per_layer[int(m.group(1)) if m else None].append(key)
        self._mapping = mapping
        self._runtime_of = runtime_of
        self._also_runtime_of = also_runtime_of
        self._layer_keys = dict(per_layer)
        self._unexpected = unexpected
        self._converted = converted
        self._conversion_of = conversion_of
        self._planned_for = id(model)
        if unexpected:
            msg = (
                f"{self.model_dir}: {len(unexpected)} checkpoint tensor(s) match no parameter of "
                f"{type(model).__name__} and are ignored, e.g. {unexpected[0]}"
            )
            self.warnings.append(msg)
            log.warning(msg)
        # what save_pretrained needs to write the original checkpoint names back
        model._weight_conversions = [m for m in mapping if m.was_used()]

    def use_layers(self, model: nn.Module, layers_path: str) -> None:
        """Take the decoder layers from `layers_path` (the definition's), re-planning if that differs."""
        self._given_layers_path = layers_path
        if self._layers_path != layers_path:
            self._plan(model)

    def checkpoint_layer_prefix(self, i: int) -> str:
        """What the checkpoint calls decoder layer `i` (`thinker.model.layers.3.` where the runtime model has
        `thinker.model.language_model.layers.3.`): read off the keys of the layer and their runtime names."""
        runtime = f"{self.layers_path}.{i}."
        votes: dict[str, int] = defaultdict(int)
        for key in self.layer_keys(i):
            tail = self._runtime_of[key][len(runtime):]
            if tail and key.endswith("." + tail):
                votes[key[: len(key) - len(tail)]] += 1
        return max(votes, key=votes.get) if votes else runtime

    def _ensure_plan(self, model: nn.Module) -> None:
        if self._planned_for != id(model):
            self._plan(model)

    # ------------------------------------------------------------------ facts

    @property
    def layers_path(self) -> str:
        if self._layers_path is None:
            raise MoedslError("call skeleton() first")
        return self._layers_path

    @property
    def num_layers(self) -> int:
        self.layers_path  # noqa: B018 - raises before skeleton()
        return self._num_layers

    @property
    def unexpected_keys(self) -> list[str]:
        """Checkpoint tensors that match no parameter of the model (ignored, as from_pretrained does)."""
        return list(self._unexpected)

    def is_converted(self, key: str) -> bool:
        """Whether checkpoint tensor `key` loads through a converter (fused, split or reshaped), not as is."""
        self.layers_path  # noqa: B018
        return key in self._converted

    def layer_keys(self, i: int) -> list[str]:
        """The checkpoint keys (on-disk names) that make up decoder layer `i`."""
        self._check_index(i)
        return list(self._layer_keys.get(i, []))

    def non_layer_keys(self) -> list[str]:
        """The checkpoint keys outside the decoder layers (embeddings, final norm, head)."""
        self.layers_path  # noqa: B018
        return list(self._layer_keys.get(None, []))

    def runtime_name(self, key: str) -> str:
        """The runtime parameter name a checkpoint key loads into (the first target of a fused one)."""
        self.layers_path  # noqa: B018
        if key not in self._runtime_of:
            self.shard_of(key)  # raises for unknown keys
            raise MoedslError(f"checkpoint tensor `{key}` matches no parameter of the model")
        return self._runtime_of[key]

    def runtime_names(self, key: str) -> list[str]:
        """Every runtime parameter a checkpoint key loads into: its `runtime_name`, and the further targets where
        a converter splits it (a fused `wqkv` into q_proj, k_proj, v_proj)."""
        return [self.runtime_name(key), *self._also_runtime_of.get(key, [])]

    def _check_index(self, i: int) -> None:
        n = self.num_layers
        if not isinstance(i, int) or not 0 <= i < n:
            raise MoedslError(f"layer index {i} out of range: the model has {n} decoder layers (0..{n - 1})")

    def _layer(self, model: nn.Module, i: int) -> nn.Module:
        self._check_index(i)
        return model.get_submodule(self.layers_path)[i]

    # ------------------------------------------------------------------ loading

    def read_keys(self, keys: list[str], pin: bool = False) -> dict[str, torch.Tensor | StoredParts]:
        """The checkpoint tensors `keys`, read from their shards into host memory (pinned when `pin`,
        for fast asynchronous copies to the GPU). Touches no model, so a background thread may read
        the next layer while the current one is worked on. A tensor stored as FP8/MXFP4 comes as its
        `StoredParts` (the stored bytes, half or a quarter of bf16's), which `load_layer` dequantizes on
        the device: reading them here keeps the shards' bytes off the main thread."""
        from safetensors import safe_open

        stored = {key: self.stored_keys(key) for key in keys}
        by_shard: dict[Path, list[str]] = defaultdict(list)
        for names in stored.values():
            for name in names:
                by_shard[self._shard_of[name]].append(name)
        raw: dict[str, torch.Tensor] = {}
        for shard, names in by_shard.items():
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    raw[name] = t.pin_memory() if pin else t
        return {key: raw[key] if names == (key,) else StoredParts({n: raw[n] for n in names})
                for key, names in stored.items()}

    def read_layer(self, i: int, pin: bool = False) -> dict[str, torch.Tensor | StoredParts]:
        """Every checkpoint tensor of decoder layer `i`, in host memory (see `read_keys`); hand the
        result to `load_layer(..., tensors=)`."""
        self.layers_path  # noqa: B018 - raises before skeleton()
        self._check_index(i)
        return self.read_keys(self._layer_keys.get(i, []), pin)

    def _load_keys(self, model: nn.Module, keys: list[str], device, tensors: dict | None = None) -> set[str]:
        """Load `keys` through transformers' conversion: from `tensors` when given (read ahead by
        `read_keys`), else from their shards (lazy slices; FP8/MXFP4 ones dequantized on the device).
        Returns the runtime names that were set."""
        api = _transformers_api()
        device = str(torch.device(device))
        tensors = tensors or {}
        load_config = api["LoadStateDictConfig"](
            pretrained_model_name_or_path=str(self.model_dir),
            device_map={"": device},
            dtype=None,  # keep the skeleton's dtype per parameter, as from_pretrained does
            weight_mapping=self._mapping,
        )
        # One conversion at a time (the keys one converter merges, e.g. every expert's gate and up into
        # one fused tensor; all unconverted keys together), the largest first: a conversion holds its
        # sources, their merged copy and its intermediates at once, so converting a whole layer in one
        # call held about twice its expert weights on the device (GLM-4.5-Air: 8 of its 4.4 GiB).
        groups: dict[int | None, list[str]] = defaultdict(list)
        for key in keys:
            groups[self._conversion_of.get(key)].append(key)
        # read-ahead tensors go to the device before the conversion, so that merging experts into fused tensors
        # (128 × 3 tensors for a Qwen3-30B-A3B layer) runs there and not on the host; from pinned memory these
        # copies are asynchronous
        on_cuda = torch.device(device).type == "cuda"
        mismatched, errors = [], {}
        with self._reader(device) as get:
            def value(k: str):
                t = tensors.get(k)
                if t is None:
                    return get(k)
                if isinstance(t, StoredParts):
                    return dequant.read(k, self.stored_keys(k), t.tensors.__getitem__, self.stored_format,
                                        device, str(self.model_dir))
                return t.to(device, non_blocking=True) if on_cuda else t

            for group in sorted(groups.values(), key=len, reverse=True):
                state = {k: value(k) for k in sorted(group, key=lambda k: str(self.shard_of(k)))}
                with quiet_transformers():
                    info, _ = api["convert_and_load"](model, state, load_config)
                del state
                mismatched += list(getattr(info, "mismatched_keys", ()) or ())
                errors.update(getattr(info, "conversion_errors", {}) or {})
        # the loader overwrites this with the transforms used by *this* call; keep them all
        model._weight_conversions = [m for m in self._mapping if m.was_used()]
        problems = []
        for key, got, want in sorted(mismatched, key=str):
            problems.append(f"`{key}`: checkpoint shape {tuple(got)}, model expects {tuple(want)}")
        for key, err in errors.items():
            problems.append(f"`{key}`: conversion failed: {str(err).strip().splitlines()[-1] if str(err) else err}")
        if problems:
            raise MoedslError(
                f"{self.model_dir}: the checkpoint does not fit {type(model).__name__}",
                notes=problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []),
            )
        return {self._runtime_of[k] for k in keys}

    def load_non_layer(self, model: nn.Module, device="cpu", skip: tuple[str, ...] = ()) -> None:
        """Materialize everything outside the decoder layers on `device`: embeddings, final norm,
        lm_head (tied or not), model-level rotary buffers and any other non-layer tensor. Modules
        under `skip` (a composite's towers, which text-only calibration never runs) stay on meta."""
        self._ensure_plan(model)
        skipped = tuple(p + "." for p in skip)
        keys = [k for k in self.non_layer_keys() if not self._runtime_of[k].startswith(skipped)]
        self._load_keys(model, keys, device)
        layers_prefix = self.layers_path + "."
        missing = {
            name
            for name, t in model.state_dict(keep_vars=True).items()
            if not name.startswith((layers_prefix, *skipped)) and t.device.type == "meta"
        }
        self._tie(model, missing)
        self._materialize_rest(model, device, exclude_prefix=(layers_prefix, *skipped),
                               what="outside the decoder layers")

    def tower_keys(self, towers: tuple[str, ...]) -> list[str]:
        """The checkpoint keys (on-disk names) of the modules under the runtime paths `towers`."""
        prefixes = tuple(p + "." for p in towers)
        return [k for k in self.non_layer_keys() if self._runtime_of[k].startswith(prefixes)]

    def load_layer(self, model: nn.Module, i: int, device="cpu", tensors: dict | None = None) -> nn.Module:
        """Materialize decoder layer `i` on `device` from the shards (reading only its tensors), or
        from `tensors` already read by `read_layer`. Returns the layer module."""
        self._ensure_plan(model)
        layer = self._layer(model, i)
        self._load_keys(model, self._layer_keys.get(i, []), device, tensors)
        self._materialize_rest(layer, device, what=f"in decoder layer {i}", owner=model)
        return layer

    def unload_layer(self, model: nn.Module, i: int) -> None:
        """Move decoder layer `i` back to the meta device (frees its storage)."""
        _to_meta(self._layer(model, i))

    def _tie(self, model: nn.Module, missing: set[str]) -> None:
        tied = getattr(model, "all_tied_weights_keys", None)
        if not tied:
            return
        if any(k in missing or v in missing for k, v in tied.items()):
            with quiet_transformers():
                model.tie_weights(missing_keys=set(missing), recompute_mapping=False)

    def _materialize_rest(
        self, root: nn.Module, device, *, exclude_prefix: str | tuple[str, ...] | None = None, what: str = "",
        owner=None,
    ) -> None:
        """Tensors under `root` still on meta are not in the checkpoint: create them on `device`
        and let the model's own `_init_weights` fill them (what from_pretrained does for missing
        keys and non-persistent buffers)."""
        owner = owner if owner is not None else root
        device = torch.device(device)
        to_init: list[nn.Module] = []
        missing_params: list[str] = []
        for mod_name, module in root.named_modules():
            if exclude_prefix and (mod_name + ".").startswith(exclude_prefix):
                continue
            touched = False
            for pname, param in list(module._parameters.items()):
                if param is None or param.device.type != "meta":
                    continue
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                module._parameters[pname] = new
                missing_params.append(f"{mod_name}.{pname}" if mod_name else pname)
                touched = True
            for bname, buf in list(module._buffers.items()):
                if buf is None or buf.device.type != "meta":
                    continue
                module._buffers[bname] = torch.empty_like(buf, device=device)
                if bname not in module._non_persistent_buffers_set:
                    missing_params.append(f"{mod_name}.{bname}" if mod_name else bname)
                touched = True
            if touched:
                to_init.append(module)
        if missing_params:
            msg = f"{self.model_dir}: not in the checkpoint ({what}), initialized as from_pretrained would: " + ", ".join(
                missing_params[:8]
            ) + (f" and {len(missing_params) - 8} more" if len(missing_params) > 8 else "")
            if self.strict:
                raise MoedslError(msg.replace("initialized as from_pretrained would", "missing"))
            self.warnings.append(msg)
            log.warning(msg)
        if not to_init:
            return
        init_fn = getattr(owner, "_init_weights", None)
        if init_fn is None:
            return
        try:
            from transformers.initialization import guard_torch_init_functions
        except ImportError:  # pragma: no cover
            guard_torch_init_functions = contextlib.nullcontext
        with torch.no_grad(), guard_torch_init_functions():
            for module in to_init:
                # loaded tensors carry `_is_hf_initialized`, so the guarded init leaves them alone
                init_fn(module)

    # ------------------------------------------------------------------ streaming

    @contextlib.contextmanager
    def stream(self, model: nn.Module, device="cpu") -> Iterator[nn.Module]:
        """Within this context a forward pass loads each decoder layer just before it runs and
        unloads it right after (forward hooks). Non-layer parts must be loaded already."""
        layers = model.get_submodule(self.layers_path)
        handles = []
        for i, layer in enumerate(layers):

            def pre(module, args, kwargs, i=i):
                self.load_layer(model, i, device)

            def post(module, args, kwargs, output, i=i):
                self.unload_layer(model, i)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()


def _to_meta(module: nn.Module) -> None:
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                sub._buffers[name] = torch.empty_like(buf, device="meta")
