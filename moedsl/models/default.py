"""The built-in tiny default model: a small qwen3_moe made from config, cached on disk.

`moedsl quantize` without a model quantizes this one, so the whole pipeline runs offline on any
machine. It is created deterministically on first use (fixed config, fixed seed) in
`$MOEDSL_CACHE/default-qwen3_moe-v2` (default `~/.cache/moedsl/...`), with `save_pretrained`
(safetensors, per-expert checkpoint names) and a byte-level tokenizer, so it loads exactly like a
real checkpoint. It is written to a temporary directory and renamed into place, so a killed
process never leaves a half-written default behind.

Shape: 4 layers, hidden 128, 16 experts, top-4, expert intermediate 128 (every width a multiple
of GPTQ group 128); layer 0 is dense (`mlp_only_layers=[0]`, intermediate 256) so both layer
kinds are exercised; vocab = the byte tokenizer's 259 ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moedsl.cache import cache_root
from moedsl.errors import MoedslError

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_MODEL_TYPE",
    "BYTE_VOCAB_SIZE",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "cache_root",
    "default_config",
    "default_model_dir",
    "build_byte_tokenizer",
    "save_byte_tokenizer",
]

DEFAULT_MODEL_TYPE = "qwen3_moe"
DEFAULT_NAME = "default-qwen3_moe-v2"  # bump the version when the recipe below changes
DEFAULT_SEED = 0
_COMPLETE_MARKER = ".moedsl-complete"

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
BYTE_VOCAB_SIZE = 256 + 3  # 256 bytes + bos, eos, pad

_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer(model_max_length: int = 4096, named_tokens: dict[str, str] | None = None):
    """A byte-level tokenizer: token id = byte value (0..255), then <|bos|> 256, <|eos|> 257,
    <|pad|> 258, then `named_tokens` (attribute -> token: {"image_token": "<|img|>"}, which a multimodal
    processor reads as `tokenizer.image_token`) from 259 on, in order. No merges, so every UTF-8 text
    round-trips exactly and any byte string fits.

    Returned as a `PreTrainedTokenizerFast`; `save_pretrained` writes tokenizer.json, so
    `AutoTokenizer.from_pretrained(dir)` works offline.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for i, tok in enumerate((BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": dict(named_tokens)} if named_tokens else {}),
    )


def save_byte_tokenizer(out_dir: str | Path, named_tokens: dict[str, str] | None = None) -> Path:
    """Save `build_byte_tokenizer()` to `out_dir` so `AutoTokenizer.from_pretrained(out_dir)` loads it.

    tokenizer_config.json names the class `PreTrainedTokenizerFast` (which transformers 4.x and
    5.x both resolve) rather than 5.x's `TokenizersBackend`, so serving engines on older
    transformers can read the tokenizer of a quantized output too.
    """
    import json

    out = Path(out_dir)
    build_byte_tokenizer(named_tokens=named_tokens).save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def default_config():
    """The default model's config (a qwen3_moe; eager attention and experts)."""
    from moedsl.models.tiny import tiny_config

    return tiny_config(DEFAULT_MODEL_TYPE, **_DEFAULT_SHAPE)


# expert width = hidden = 128 so that the default group size (128) divides every input
_DEFAULT_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    mlp_only_layers=[0],
    decoder_sparse_step=1,
    vocab_size=BYTE_VOCAB_SIZE,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


def _is_complete(path: Path) -> bool:
    if not (path / _COMPLETE_MARKER).is_file():
        return False
    if not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    return any(path.glob("*.safetensors"))


def _write_default(path: Path) -> None:
    from moedsl.models.tiny import save_tiny

    save_tiny(DEFAULT_MODEL_TYPE, path, seed=DEFAULT_SEED, **_DEFAULT_SHAPE)
    (path / _COMPLETE_MARKER).write_text(f"{DEFAULT_NAME}\n")


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The directory of the built-in default model, created on first use.

    Creation is atomic: the model is written to a temporary sibling directory and renamed into
    place. A concurrent creator that loses the race discards its copy and uses the winner's.
    """
    root = cache_root(cache_dir)
    final = root / DEFAULT_NAME
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoedslError(
            f"cannot create the moedsl cache directory {root}: {exc.strerror or exc}",
            notes=["set MOEDSL_CACHE to a writable directory"],
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.tmp-", dir=root))
    try:
        _write_default(tmp)
        if final.exists() and not _is_complete(final):
            # a damaged leftover (not written by this code, which renames atomically): replace it
            trash = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.trash-", dir=root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not a lost race: a real error
                raise
    except OSError as exc:
        raise MoedslError(
            f"cannot write the default model to {final}: {exc.strerror or exc}",
            notes=["set MOEDSL_CACHE to a writable directory"],
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
