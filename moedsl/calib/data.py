"""Calibration data: token ids for the GPTQ forwards.

`load_calibration(path, model_dir, n_samples, seq_len, seed)` returns a `CalibrationSet` whose
`input_ids` is a LongTensor [n_samples, seq_len]. Sources:

- token-id files: `.jsonl` (each line a JSON list of ints, an object with `input_ids`, or an
  object with `text`, which is tokenized), `.npy` (1-D or 2-D integer array; rows are documents),
  `.safetensors` (a tensor named `input_ids`, or the only tensor; 1-D or 2-D integer);
- text files (`.txt`, `.md`, any other suffix): tokenized with the model's tokenizer;
- no path: the built-in text `moedsl/data/calib_text.txt` (prose and code, see
  `moedsl/data/README.md`), tokenized with the model's tokenizer; when the model directory has no
  tokenizer, random ids in [0, vocab_size) and a warning.

Documents are concatenated (separated by the tokenizer's EOS when text is tokenized) into one
stream that is cut into `n_samples` windows of `seq_len` tokens: non-overlapping windows from a
seeded random offset, picked in a seeded random order. With too few tokens the stream wraps around
(windows repeat tokens) and a warning says so. Every id is checked against the model's
vocab_size; bad input raises `MoedslError` naming the file and the line (or row) and the value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moedsl.errors import MoedslError, Span

__all__ = ["CalibrationSet", "load_calibration", "builtin_text_path", "TOKEN_ID_SUFFIXES"]

TOKEN_ID_SUFFIXES = (".jsonl", ".npy", ".safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class CalibrationSet:
    """Calibration token ids and where they came from."""

    input_ids: torch.Tensor  # LongTensor [n_samples, seq_len]
    source: str  # human-readable description of the source
    warnings: list[str] = field(default_factory=list)  # the caller prints these
    n_tokens: int = 0  # tokens in the source stream before windowing

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def builtin_text_path() -> Path:
    """The built-in calibration text shipped with moedsl."""
    return Path(__file__).resolve().parent.parent / "data" / "calib_text.txt"


# ------------------------------------------------------------------------------------------
# model facts
# ------------------------------------------------------------------------------------------


def _model_vocab_size(model_dir: Path | None) -> int | None:
    if model_dir is None:
        return None
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MoedslError(f"{model_dir}: no config.json (not a transformers model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoedslError(f"{cfg_path}: not valid JSON: {exc}") from None
    thinker = cfg.get("thinker_config") if isinstance(cfg.get("thinker_config"), dict) else {}
    for holder in (cfg, cfg.get("text_config") or {}, thinker.get("text_config") or {}):  # omni: the thinker's
        v = holder.get("vocab_size") if isinstance(holder, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _has_tokenizer(model_dir: Path | None) -> bool:
    return model_dir is not None and any((model_dir / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from moedsl.models.tiny import quiet_transformers

    try:
        with quiet_transformers():
            # an explicit bool: with None, transformers would stop and ask on stdin about remote code
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MoedslError(f"{model_dir}: cannot load the tokenizer: {type(exc).__name__}: {exc}") from None


class _Tokenize:
    """Tokenizes documents with the model's tokenizer, loaded on first use."""

    def __init__(self, model_dir: Path | None, trust_remote_code: bool = False):
        self.model_dir = model_dir
        self.trust_remote_code = trust_remote_code
        self._tok = None

    def available(self) -> bool:
        return _has_tokenizer(self.model_dir)

    def __call__(self, text: str, where: str) -> list[int]:
        if self._tok is None:
            if not self.available():
                where_dir = f"model directory {self.model_dir}" if self.model_dir else "no model directory"
                raise MoedslError(
                    f"{where}: text needs a tokenizer, and {where_dir} has none",
                    notes=["give token ids instead (.jsonl lists of ints, .npy or .safetensors)"],
                )
            self._tok = _load_tokenizer(self.model_dir, self.trust_remote_code)
        from moedsl.models.tiny import quiet_transformers

        with quiet_transformers():  # "sequence longer than model_max_length" is fine here
            ids = self._tok(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    @property
    def separator(self) -> list[int]:
        eos = getattr(self._tok, "eos_token_id", None) if self._tok is not None else None
        return [int(eos)] if isinstance(eos, int) else []


# ------------------------------------------------------------------------------------------
# readers: each returns a list of (documents, location label) pairs
# ------------------------------------------------------------------------------------------

Doc = tuple[list[int], str]  # token ids, "file:line" / "file: row 3" for error messages


def _line_span(path: Path, lineno: int, line: str, col: int = 1) -> Span:
    shown = line if len(line) <= 200 else line[:200] + "…"
    return Span(file=str(path), line=lineno, col=max(1, col), length=1, source="\n" * (lineno - 1) + shown)


def _check_int_list(value, path: Path, lineno: int, line: str, what: str) -> list[int]:
    if not isinstance(value, list):
        raise MoedslError(
            f"{what} must be a list of token ids, got {type(value).__name__}", span=_line_span(path, lineno, line)
        )
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise MoedslError(
                f"{what}[{j}] is {json.dumps(v)[:40]}, not an integer token id", span=_line_span(path, lineno, line)
            )
        if v < 0:
            raise MoedslError(f"{what}[{j}] is {v}: token ids are never negative", span=_line_span(path, lineno, line))
    return value


class _BadNumber(ValueError):
    """A JSON number no token id can be (raised while parsing, so a 5000-digit integer is never built)."""


def _token_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 18:  # int64 holds 18 digits safely; no vocabulary comes near
        raise _BadNumber(f"the integer {text[:20]}… ({len(digits)} digits) is no token id")
    return int(text)


def _no_constant(name: str):
    raise _BadNumber(f"`{name}` is not a token id (token ids are integers)")


def _read_jsonl(path: Path, tokenize: _Tokenize) -> list[Doc]:
    docs: list[Doc] = []
    text = _read_text(path)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_int=_token_int, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise MoedslError(f"not valid JSON: {exc.msg}", span=_line_span(path, lineno, line, exc.colno)) from None
        except _BadNumber as exc:
            raise MoedslError(str(exc), span=_line_span(path, lineno, line)) from None
        except RecursionError:
            raise MoedslError("JSON nested too deeply (a token-id line is a flat list, or an object holding one)",
                              span=_line_span(path, lineno, line)) from None
        where = f"{path}:{lineno}"
        if isinstance(obj, list):
            docs.append((_check_int_list(obj, path, lineno, line, "the line"), where))
        elif isinstance(obj, dict) and "input_ids" in obj:
            docs.append((_check_int_list(obj["input_ids"], path, lineno, line, "`input_ids`"), where))
        elif isinstance(obj, dict) and "text" in obj:
            if not isinstance(obj["text"], str):
                raise MoedslError("`text` must be a string", span=_line_span(path, lineno, line))
            docs.append((tokenize(obj["text"], where), where))
        else:
            got = f"an object with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
            raise MoedslError(
                f"expected a list of token ids, or an object with `input_ids` or `text`; got {got}",
                span=_line_span(path, lineno, line),
            )
    return docs


def _rows_of_array(arr, path: Path, name: str = "") -> list[Doc]:
    """1-D -> one document, 2-D -> one per row. `arr` is a torch tensor."""
    label = f"{path}" + (f" tensor `{name}`" if name else "")
    if arr.dtype.is_floating_point or arr.dtype.is_complex or arr.dtype == torch.bool:
        raise MoedslError(f"{label}: token ids must be integers, got dtype {str(arr.dtype).replace('torch.', '')}")
    if arr.dim() == 1:
        rows = [arr]
    elif arr.dim() == 2:
        rows = list(arr)
    else:
        raise MoedslError(f"{label}: expected a 1-D or 2-D array of token ids, got shape {tuple(arr.shape)}")
    docs: list[Doc] = []
    for r, row in enumerate(rows):
        where = f"{label}: row {r}" if arr.dim() == 2 else label
        values = row.to(torch.int64)
        neg = (values < 0).nonzero()
        if len(neg):
            c = int(neg[0, 0])
            raise MoedslError(f"{where}, column {c}: token id {int(values[c])} is negative")
        docs.append((values.tolist(), where))
    return docs


def _read_npy(path: Path) -> list[Doc]:
    import numpy as np

    magic = b"\x93NUMPY"
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as exc:
        raise MoedslError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head != magic:
        raise MoedslError(f"{path}: not a .npy array file (it does not start with numpy's magic bytes)",
                          notes=["give .npy files written by numpy.save; text goes in a .txt or .jsonl file"])
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle: a .npy of objects is refused
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise MoedslError(f"{path}: the array holds Python objects, not integer token ids",
                              notes=["save an integer array (numpy.save of an int32/int64 array)"]) from None
        raise MoedslError(f"{path}: not a readable .npy array: {exc}") from None
    except Exception as exc:  # numpy raises OSError/EOFError and others for damaged files
        raise MoedslError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise MoedslError(f"{path}: expected a single array, got {type(arr).__name__}")
    if arr.dtype.kind not in "iu":
        raise MoedslError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise MoedslError(f"{path}: token id {int(arr.max())} does not fit int64")
    return _rows_of_array(torch.from_numpy(arr.astype(np.int64, copy=False)), path)


def _read_safetensors(path: Path) -> list[Doc]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if "input_ids" in names:
                name = "input_ids"
            elif len(names) == 1:
                name = names[0]
            elif not names:
                raise MoedslError(f"{path}: the file holds no tensors")
            else:
                from moedsl.errors import nearest

                raise MoedslError(
                    f"{path}: no tensor named `input_ids`, and {len(names)} tensors to choose from",
                    expected=["input_ids"],
                    suggestion=nearest("input_ids", names),
                    notes=[f"tensors: {', '.join(sorted(names)[:10])}"],
                )
            arr = f.get_tensor(name)
    except MoedslError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise MoedslError(f"{path}: not a readable safetensors file: {exc}") from None
    return _rows_of_array(arr, path, name)


def _read_text(path: Path) -> str:
    from moedsl.textfile import read_text

    return read_text(path)


# ------------------------------------------------------------------------------------------
# windows
# ------------------------------------------------------------------------------------------


def _windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, bool]:
    """Cut `stream` into `n_samples` windows of `seq_len`. Returns (windows, wrapped)."""
    total = int(stream.numel())
    need = n_samples * seq_len
    gen = torch.Generator().manual_seed(int(seed))
    if total >= need:
        n_chunks = total // seq_len
        slack = total - n_chunks * seq_len
        offset = int(torch.randint(0, slack + 1, (1,), generator=gen)) if slack else 0
        chunks = stream[offset : offset + n_chunks * seq_len].view(n_chunks, seq_len)
        pick = torch.randperm(n_chunks, generator=gen)[:n_samples]
        return chunks[pick].clone(), False
    # too few tokens: wrap the stream around
    offset = int(torch.randint(0, total, (1,), generator=gen))
    reps = math.ceil((need + offset) / total)
    tiled = stream.repeat(reps)[offset : offset + need]
    return tiled.view(n_samples, seq_len).clone(), True


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------


def load_calibration(
    path: str | Path | None,
    model_dir: str | Path | None,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    vocab_size: int | None = None,
    trust_remote_code: bool = False,
) -> CalibrationSet:
    """Calibration token ids [n_samples, seq_len] from `path` (or the built-in text).

    `model_dir` provides the tokenizer (for text) and `vocab_size` (from config.json) that every
    id is checked against; `vocab_size=` overrides it. Deterministic for a given `seed`.
    `trust_remote_code`: the tokenizer may be the model directory's own code (its `auto_map`).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise MoedslError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise MoedslError(f"seq_len must be a positive integer, got {seq_len!r}")
    mdir = Path(model_dir) if model_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise MoedslError(f"model directory {mdir} does not exist")
    vocab = vocab_size if vocab_size is not None else _model_vocab_size(mdir)
    tokenize = _Tokenize(mdir, trust_remote_code)
    warnings: list[str] = []

    if path is None:
        if not tokenize.available():
            if vocab is None:
                raise MoedslError(
                    "no calibration file, and no model directory with a tokenizer or a vocab_size to draw ids from"
                )
            gen = torch.Generator().manual_seed(int(seed))
            ids = torch.randint(0, vocab, (n_samples, seq_len), generator=gen, dtype=torch.int64)
            where = f"model directory {mdir}" if mdir else "no model directory"
            warnings.append(
                f"{where} has no tokenizer: calibrating on random token ids in [0, {vocab}); "
                "give --calib with token ids for a meaningful calibration"
            )
            return CalibrationSet(ids, f"random token ids in [0, {vocab}) (seed {seed})", warnings, n_samples * seq_len)
        src = builtin_text_path()
        if not src.is_file():
            raise MoedslError(f"the built-in calibration text {src} is missing (broken install)")
        docs = [(tokenize(_read_text(src), str(src)), str(src))]
        source = f"built-in text {src.name}"
        separator = tokenize.separator
    else:
        src = Path(path)
        if not src.exists():
            raise MoedslError(f"calibration file {src} does not exist")
        if src.is_dir():
            raise MoedslError(f"calibration path {src} is a directory, not a file")
        suffix = src.suffix.lower()
        if suffix == ".jsonl":
            docs = _read_jsonl(src, tokenize)
        elif suffix == ".npy":
            docs = _read_npy(src)
        elif suffix == ".safetensors":
            docs = _read_safetensors(src)
        else:
            docs = [(tokenize(_read_text(src), str(src)), str(src))]
        source = str(src)
        separator = tokenize.separator

    # validate ids against the vocabulary
    if vocab is not None:
        for ids, where in docs:
            if ids:
                hi = max(ids)
                if hi >= vocab:
                    col = ids.index(hi)
                    raise MoedslError(
                        f"{where}: token id {hi} (position {col}) is out of range: "
                        f"the model's vocab_size is {vocab}",
                        notes=[f"valid ids are 0..{vocab - 1}"],
                    )
    else:
        warnings.append("no model directory: token ids were not checked against a vocab_size")

    parts: list[list[int]] = []
    for ids, _ in docs:
        if not ids:
            continue
        if parts and separator:
            parts.append(separator)
        parts.append(ids)
    stream = torch.tensor([i for part in parts for i in part], dtype=torch.int64)
    if stream.numel() == 0:
        raise MoedslError(f"{source}: no calibration tokens (the file is empty)")
    ids, wrapped = _windows(stream, n_samples, seq_len, seed)
    if wrapped:
        warnings.append(
            f"{source}: {stream.numel()} tokens are fewer than {n_samples} samples × {seq_len} = "
            f"{n_samples * seq_len}; the samples wrap around and repeat tokens"
        )
    return CalibrationSet(ids, source, warnings, int(stream.numel()))
