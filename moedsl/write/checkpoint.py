"""Streaming checkpoint writer: quantized modules and plain tensors in, safetensors shards out.

    writer = CheckpointWriter(out_dir, "gptq", cfg)
    for each decoder layer:
        writer.add_quantized("model.layers.3.mlp.experts.7.down_proj", result, bias=None, dtype=torch.bfloat16)
        writer.add_tensor("model.layers.3.input_layernorm.weight", norm_weight)
        writer.flush_shard("layer-00003.safetensors")
    writer.add_tensor(...); writer.flush_shard("rest.safetensors")
    writer.finalize(model_config_dict, {"generation_config.json": {...}})

Guarantees:
  * a shard appears under its final name only once it is completely written (written to a
    hidden temporary name, fsynced, then renamed), so a killed run never leaves a
    half-written shard that looks finished; `adopt_shard` re-registers finished shards when
    a run resumes;
  * the same inputs give byte-identical files (sorted keys, no timestamps);
  * bad input raises MoedslError before anything is written for that module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors import safe_open

from moedsl.errors import MoedslError
from moedsl.gptq.quantizer import QuantConfig, QuantResult, QuantStack
from moedsl.write.compressed_tensors import check_ct_config, ct_quantization_config, ct_tensors, ct_tensors_stacked
from moedsl.write.engines import gptq_module_list, targets_for
from moedsl.write.files import filesystem_error, save_atomic, write_all_atomic
from moedsl.write.gptq_format import (CheckpointFormat, check_gptq_config, gptq_quantize_config, gptq_tensors,
                                     gptq_tensors_stacked)

Format = Literal["gptq", "compressed-tensors"]
FORMATS = ("gptq", "compressed-tensors")
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
RESERVED = (INDEX_NAME, CONFIG_NAME, QUANTIZE_CONFIG_NAME)


def required_scale_dtype(fmt: Format, model_dtype: torch.dtype) -> str:
    """The QuantConfig.scale_dtype that makes `fmt` store exactly the quantizer's scales."""
    if fmt == "gptq":
        return "float16"
    return str(model_dtype).removeprefix("torch.")


class CheckpointWriter:
    def __init__(
        self,
        out_dir: str | os.PathLike,
        fmt: Format,
        cfg: QuantConfig,
        *,
        ignore: list[str] | tuple[str, ...] = ("lm_head",),
        gptq_checkpoint_format: CheckpointFormat = "gptq",
        extra_quantization_config: Mapping[str, Any] | None = None,
        quantizer: str = "moedsl",
        gptq_prefixes: Mapping[str, str] | None = None,
    ):
        """fmt: "gptq" or "compressed-tensors".

        ignore: compressed-tensors only: module names (or "re:" patterns) that are Linear but
            not quantized. Every 2-D `*.weight` added with add_tensor is added automatically.
        gptq_checkpoint_format: "gptq" (v1, zero − 1 stored; the default every loader reads)
            or "gptq_v2" (zero stored as is).
        extra_quantization_config: merged last into the quantization config (e.g. GPTQ's
            `dynamic` per-module overrides).
        gptq_prefixes: GPTQ only: name pieces an engine's module prefixes spell otherwise
            (`engines.gptq_prefixes`), listed that way too in `modules_in_block_to_quantize`.
        """
        if fmt not in FORMATS:
            raise MoedslError(f"unknown checkpoint format `{fmt}`", expected=list(FORMATS), code="write")
        if fmt == "gptq":
            check_gptq_config(cfg, gptq_checkpoint_format)
        else:
            check_ct_config(cfg)
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.cfg = cfg
        self.gptq_checkpoint_format = gptq_checkpoint_format
        self.extra_quantization_config = dict(extra_quantization_config or {})
        self.quantizer = quantizer
        self.gptq_prefixes = dict(gptq_prefixes or {})
        self._ignore = set(ignore)
        self._pending: dict[str, torch.Tensor] = {}
        self._weight_map: dict[str, str] = {}  # key -> shard file name, for flushed tensors
        self._shard_bytes: dict[str, int] = {}
        self._finalized = False
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise filesystem_error(exc, self.out_dir, "create") from None

    # ---- adding -----------------------------------------------------------------------

    def add_quantized(
        self,
        name: str,
        result: QuantResult,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        expert: bool = False,
        join: str = ".",
        omit: tuple[str, ...] = (),
    ) -> None:
        """Add the quantized module `name` (checkpoint name without `.weight`).

        dtype: the model dtype; compressed-tensors stores scales and bias in it, GPTQ stores
            bias in it (GPTQ scales are always float16).
        expert: the module is a routed MoE expert (compressed-tensors refuses asymmetric ones).
        join, omit: keys are `name + join + local`; `omit` drops local keys. Both serve engines that
            name stacked experts as one leaf (`experts.3.w13_weight_packed`, engines.StackedExperts).
        """
        self._check_open()
        self._check_name(name)
        if self.fmt == "gptq":
            tensors = gptq_tensors(name, result, self.cfg, bias, dtype, self.gptq_checkpoint_format)
        else:
            tensors = ct_tensors(name, result, self.cfg, dtype, bias, expert)
        # every tensor is new (packed, or copied where it could share the caller's storage: one g_idx
        # serves every matrix that shared a Hessian, and the caller keeps it)
        self.add_packed(name, tensors, join=join, omit=omit)

    def pack_stack(self, names: list[str], stack: QuantStack, dtype: torch.dtype = torch.bfloat16, *,
                   expert: bool = False) -> dict[str, torch.Tensor]:
        """The stored tensors of n modules at once (`names`, one per matrix of `stack`), by local key,
        each [n, ...] on the stack's device (GPU packing). Reads only the writer's settings, so the
        packer may call it while another thread adds and flushes; `add_packed` takes the results."""
        for name in names:
            self._check_name(name)
        if self.fmt == "gptq":
            return gptq_tensors_stacked(names, stack, self.cfg, dtype, self.gptq_checkpoint_format)
        return ct_tensors_stacked(names, stack, self.cfg, dtype, expert)

    def add_packed(self, name: str, tensors: Mapping[str, torch.Tensor], *, join: str = ".",
                   omit: tuple[str, ...] = ()) -> None:
        """Add module `name` from its stored tensors by local key (`pack_stack`'s, one matrix of them),
        which must be on the CPU (views of one buffer are fine: each is written from its own memory).
        join, omit: as for `add_quantized`."""
        self._check_open()
        self._check_name(name)
        keys = {f"{name}{join}{local}": t for local, t in tensors.items() if local not in omit}
        for key in keys:
            self._check_new_key(key)
        self._pending.update(keys)

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Add an unquantized tensor, stored unchanged under `key` (a copy is taken now)."""
        self._check_open()
        if not isinstance(key, str) or not key or key != key.strip():
            raise MoedslError(f"invalid tensor key {key!r}", code="write")
        if not isinstance(tensor, torch.Tensor):
            raise MoedslError(f"`{key}` is a {type(tensor).__name__}, not a tensor", code="write")
        self._check_new_key(key)
        self._pending[key] = tensor.detach().to("cpu", copy=True).contiguous()
        if key.endswith(".weight") and tensor.dim() == 2:
            self._ignore.add(key.removesuffix(".weight"))

    # ---- shards -----------------------------------------------------------------------

    def flush_shard(self, shard_name: str) -> Path | None:
        """Write everything added since the last flush to `shard_name`; None if nothing was added."""
        self._check_open()
        self._check_shard_name(shard_name)
        if not self._pending:
            return None
        tensors = dict(sorted(self._pending.items()))
        path = self.out_dir / shard_name
        save_atomic(path, tensors, metadata={"format": "pt"})
        for key in tensors:
            self._weight_map[key] = shard_name
        self._shard_bytes[shard_name] = sum(t.numel() * t.element_size() for t in tensors.values())
        self._pending.clear()
        return path

    def adopt_shard(self, shard_name: str) -> list[str]:
        """Register a shard finished by an earlier (killed) run, so finalize indexes it; its keys."""
        self._check_open()
        self._check_shard_name(shard_name)
        path = self.out_dir / shard_name
        if not path.is_file():
            raise MoedslError(f"cannot adopt shard `{shard_name}`: {path} does not exist", code="write")
        total = 0
        keys = []
        shapes = []
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in sorted(f.keys()):
                    piece = f.get_slice(key)
                    keys.append(key)
                    shapes.append((piece.get_shape(), piece.get_dtype()))
        except Exception as exc:  # safetensors raises its own error types
            raise MoedslError(f"cannot adopt shard `{shard_name}`: {path} is not a readable safetensors file: {exc}",
                              code="write") from None
        for key, (shape, dtype) in zip(keys, shapes):
            self._check_new_key(key)
            numel = 1
            for n in shape:
                numel *= n
            total += numel * _dtype_size(dtype)
            if key.endswith(".weight") and len(shape) == 2:
                self._ignore.add(key.removesuffix(".weight"))
        for key in keys:
            self._weight_map[key] = shard_name
        self._shard_bytes[shard_name] = total
        return keys

    def has_shard(self, shard_name: str) -> bool:
        return shard_name in self._shard_bytes

    # ---- the end ----------------------------------------------------------------------

    def quantized_modules(self) -> list[str]:
        """Every quantized module written so far (adopted shards included), by checkpoint name."""
        marker = "qweight" if self.fmt == "gptq" else "weight_packed"
        keys = list(self._weight_map) + list(self._pending)
        return sorted(k.removesuffix(marker)[:-1] for k in keys if k.endswith(marker) and k[-len(marker) - 1] in "._")

    def ignored(self) -> list[str]:
        """The modules compressed-tensors' `ignore` names so far (every module stored unquantized)."""
        return sorted(self._ignore)

    def ignore(self, names: list[str]) -> None:
        """Name more modules in compressed-tensors' `ignore`: the runtime names of unquantized modules,
        which loaders that match `ignore` on the model they build see instead of checkpoint names."""
        self._check_open()
        self._ignore.update(names)

    def quantization_config(self) -> dict:
        """The format's config. Module names serving engines need to match are derived from the
        tensors written (moedsl/write/engines.py says why each is there)."""
        quantized = self.quantized_modules()
        if self.fmt == "gptq":
            qc = gptq_quantize_config(self.cfg, self.gptq_checkpoint_format, self.quantizer)
            # one list of names: the `list[list[str]]` transformers' GPTQConfig documents; vLLM flattens it
            qc["modules_in_block_to_quantize"] = [gptq_module_list(quantized, self.gptq_prefixes)]
        else:
            qc = ct_quantization_config(self.cfg, sorted(self._ignore - set(quantized)), targets_for(quantized))
        qc.update(self.extra_quantization_config)
        return qc

    def finalize(self, config: Mapping[str, Any], extra_files: Mapping[str, Any] | None = None) -> None:
        """Write the index, config.json (with quantization_config), quantize_config.json (GPTQ)
        and `extra_files` (name -> str, bytes, or a dict/list written as JSON): all of them are
        written (as hidden partial files) before any is renamed into place, config.json last, so
        a full disk leaves none of them and config.json's presence marks a finished checkpoint.
        Write every other file of the directory (tokenizer, ...) before calling this."""
        self._check_open()
        if self._pending:
            raise MoedslError(
                f"{len(self._pending)} tensor(s) were added after the last flush_shard "
                f"(e.g. `{next(iter(sorted(self._pending)))}`); flush them into a shard before finalize",
                code="write",
            )
        if not self._weight_map:
            raise MoedslError("nothing to finalize: no shard was written", code="write")
        extra_files = dict(extra_files or {})
        for name in extra_files:
            if not _plain_file_name(name) or name in RESERVED or name in self._shard_bytes:
                raise MoedslError(
                    f"extra file name `{name}` is not a plain file name or collides with a file the writer owns",
                    code="write",
                )
        qc = self.quantization_config()
        index = {
            "metadata": {"total_size": sum(self._shard_bytes.values())},
            "weight_map": dict(sorted(self._weight_map.items())),
        }
        files = {INDEX_NAME: _json_bytes(index)}
        if self.fmt == "gptq":
            files[QUANTIZE_CONFIG_NAME] = _json_bytes(qc)
        for name in sorted(extra_files):
            content = extra_files[name]
            if isinstance(content, str):
                content = content.encode()
            elif not isinstance(content, bytes):
                content = _json_bytes(content)
            files[name] = content
        full = dict(config)
        full["quantization_config"] = qc
        files[CONFIG_NAME] = _json_bytes(full)
        write_all_atomic([(self.out_dir / name, data) for name, data in files.items()])
        self._finalized = True

    # ---- checks -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finalized:
            raise MoedslError("this checkpoint writer has already been finalized", code="write")

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name != name.strip() or name.endswith("."):
            raise MoedslError(f"invalid module name {name!r}", code="write")
        if name.endswith(".weight"):
            raise MoedslError(
                f"module name `{name}` ends in `.weight`; pass the module name without it",
                suggestion=name.removesuffix(".weight"),
                code="write",
            )

    def _check_new_key(self, key: str) -> None:
        if key in self._pending or key in self._weight_map:
            where = self._weight_map.get(key, "the current shard")
            raise MoedslError(f"tensor `{key}` was already added (in {where})", code="write")

    def _check_shard_name(self, shard_name: str) -> None:
        if not _plain_file_name(shard_name) or not shard_name.endswith(".safetensors"):
            raise MoedslError(
                f"shard name `{shard_name}` must be a plain file name ending in .safetensors", code="write"
            )
        if shard_name in self._shard_bytes:
            raise MoedslError(f"shard `{shard_name}` was already written", code="write")


def _plain_file_name(name: str) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _json_bytes(obj: Any) -> bytes:
    def default(o):
        if isinstance(o, torch.dtype):
            return str(o).removeprefix("torch.")
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    return (json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n").encode()


_DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _dtype_size(name: str) -> int:
    try:
        return _DTYPE_SIZES[name.upper()]
    except KeyError:
        raise MoedslError(f"unknown safetensors dtype {name}", code="write") from None
