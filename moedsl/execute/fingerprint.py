"""What a run read, so that a resumed run continues only an interrupted run of the same source.

The fingerprint of a run is its options (`QuantizeOptions.fingerprint`) and its source:
- every safetensors shard of the model: its size, modification time and the hash of its header
  (names, dtypes, shapes, offsets); hashing terabytes of weights is not affordable, and any
  in-place change of a shard changes its modification time;
- the small files the run reads (config.json, the index, generation and tokenizer files): the
  hash of their content;
- the calibration tokens: the hash of the token ids the run quantizes with (whatever file, text,
  tokenizer or seed they came from);
- the compiled hook plan (the definition as bound to the model): its hash.

`changes(saved, now)` says, in words, what differs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from moedsl.errors import MoedslError

# files copied from the model directory into the output, beside the checkpoint: the tokenizer's, and a
# multimodal model's processors (an engine serving a vision-language or omni model builds its processor from
# them: vLLM refuses a directory without preprocessor_config.json, "Can't load image processor")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "chat_template.json")
_READ_FILES = ("config.json", "model.safetensors.index.json", *SIDE_FILES)

_OPTION_FLAGS = {"definition": "--def", "damp_percent": "--damp", "sym": "--sym/--asym"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shard(path: Path) -> dict:
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = f.read(min(n, 100_000_000))
    except OSError as exc:
        raise MoedslError(f"cannot read {path}: {exc.strerror or exc}") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": _sha256(head + header)}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MoedslError(f"cannot read {path}: {exc.strerror or exc}") from None


def source_fingerprint(model_dir: Path, shards: list[Path], input_ids: torch.Tensor, plan) -> dict:
    model_dir = Path(model_dir)
    files = {p.name: _shard(p) for p in sorted(set(shards))}
    files |= {name: {"sha256": _sha256(_read(model_dir / name))} for name in _READ_FILES
              if (model_dir / name).is_file()}
    ids = input_ids.to(torch.int64).contiguous().cpu()
    return {
        "files": files,
        "calibration": _sha256(json.dumps(list(ids.shape)).encode() + ids.numpy().tobytes()),
        "plan": _sha256(plan.model_dump_json().encode()),
    }


def changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(options that differ, source changes) between a saved fingerprint and this run's, in words."""
    options = []
    old_opts, new_opts = saved.get("options", {}), now.get("options", {})
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            flag = _OPTION_FLAGS.get(key, "--" + key.replace("_", "-"))
            options.append(f"{flag} was {old_opts.get(key)}, now {new_opts.get(key)}")
    source = []
    old_src, new_src = saved.get("source", {}), now.get("source", {})
    old_files, new_files = old_src.get("files", {}), new_src.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            source.append(f"{name} is gone")
        elif name not in old_files:
            source.append(f"{name} is new")
        elif old_files[name] != new_files[name]:
            source.append(f"{name} changed")
    if old_src.get("calibration") != new_src.get("calibration"):
        source.append("the calibration tokens differ")
    if old_src.get("remote_code") != new_src.get("remote_code"):
        source.append("the model's own code files changed")
    if old_src.get("plan") != new_src.get("plan"):
        source.append("the definition compiles to another plan")
    if not options and not source and saved != now:
        source.append("the interrupted run was made by another moedsl version")
    return options, source
