"""Calibration data: every format read back from real files; every bad input a MoedslError naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moedsl.calib import CalibrationSet, builtin_text_path, load_calibration
from moedsl.errors import MoedslError
from moedsl.models.default import BYTE_VOCAB_SIZE, save_byte_tokenizer

VOCAB = 300


@pytest.fixture()
def model_dir(tmp_path):
    """A model directory with a config (vocab 300) and the byte tokenizer; no weights needed."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "vocab_size": VOCAB}))
    save_byte_tokenizer(d)
    return d


@pytest.fixture()
def bare_model_dir(tmp_path):
    """A model directory without a tokenizer."""
    d = tmp_path / "bare"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "vocab_size": VOCAB}))
    return d


def _stream_windows(calib: CalibrationSet, stream: list[int]) -> None:
    """Every window is a contiguous piece of the (possibly wrapped) stream."""
    doubled = stream * (2 + calib.n_samples * calib.seq_len // max(1, len(stream)))
    text = ",".join(map(str, doubled))
    for row in calib.input_ids.tolist():
        assert ",".join(map(str, row)) in text


def test_jsonl_lists_and_objects(tmp_path, model_dir):
    path = tmp_path / "calib.jsonl"
    rows = [list(range(i * 10, i * 10 + 10)) for i in range(6)]
    lines = [json.dumps(rows[0]), json.dumps({"input_ids": rows[1]}), "", json.dumps(rows[2])]
    lines += [json.dumps(r) for r in rows[3:]]
    path.write_text("\n".join(lines) + "\n")
    calib = load_calibration(path, model_dir, n_samples=4, seq_len=12, seed=0)
    assert calib.input_ids.shape == (4, 12) and calib.input_ids.dtype == torch.int64
    assert calib.source == str(path) and calib.warnings == [] and calib.n_tokens == 60
    _stream_windows(calib, [t for r in rows for t in r])
    # windows do not overlap when there are enough tokens
    flat = calib.input_ids.flatten().tolist()
    assert len(set(flat)) == len(flat)


def test_jsonl_text_lines_are_tokenized(tmp_path, model_dir):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "héllo"}) + "\n")
    calib = load_calibration(path, model_dir, n_samples=1, seq_len=18, seed=0)
    expected = list(b"hello world") + [257] + list("héllo".encode())  # docs joined by <|eos|>
    _stream_windows(calib, expected)
    assert calib.n_tokens == len(expected)


def test_npy_one_and_two_dimensional(tmp_path, model_dir):
    one = tmp_path / "one.npy"
    np.save(one, np.arange(100, dtype=np.int32))
    calib = load_calibration(one, model_dir, n_samples=5, seq_len=20, seed=1)
    assert sorted(calib.input_ids.flatten().tolist()) == list(range(100))
    two = tmp_path / "two.npy"
    np.save(two, np.arange(120, dtype=np.int64).reshape(4, 30))
    calib = load_calibration(two, model_dir, n_samples=3, seq_len=16, seed=2)
    assert calib.input_ids.shape == (3, 16)
    _stream_windows(calib, list(range(120)))


def test_safetensors_named_and_single(tmp_path, model_dir):
    from safetensors.torch import save_file

    named = tmp_path / "named.safetensors"
    save_file({"input_ids": torch.arange(64).view(2, 32), "attention_mask": torch.ones(2, 32, dtype=torch.int64)}, str(named))
    calib = load_calibration(named, model_dir, n_samples=2, seq_len=32, seed=0)
    assert sorted(calib.input_ids.flatten().tolist()) == list(range(64))
    single = tmp_path / "single.safetensors"
    save_file({"tokens": torch.arange(50, dtype=torch.int32)}, str(single))
    calib = load_calibration(single, model_dir, n_samples=5, seq_len=10, seed=0)
    assert sorted(calib.input_ids.flatten().tolist()) == list(range(50))


@pytest.mark.parametrize("name", ["notes.txt", "README.md", "data.csv"])
def test_text_files_are_tokenized(tmp_path, model_dir, name):
    path = tmp_path / name
    text = "The quick brown fox jumps over the lazy dog. " * 4
    path.write_text(text)
    calib = load_calibration(path, model_dir, n_samples=4, seq_len=40, seed=0)
    for row in calib.input_ids.tolist():
        assert bytes(row).decode() in text * 2


def test_builtin_text(model_dir):
    text = builtin_text_path().read_text(encoding="utf-8")
    assert 30_000 <= len(text.encode()) <= 60_000
    assert "def " in text and "#include" in text and "fn main" in text  # code, several languages
    assert "Four score and seven years ago" in text  # public-domain passage
    calib = load_calibration(None, model_dir, n_samples=8, seq_len=128, seed=0)
    assert calib.input_ids.shape == (8, 128)
    assert calib.warnings == [] and "calib_text.txt" in calib.source
    assert calib.n_tokens == len(text.encode())  # byte tokenizer: one token per byte
    again = load_calibration(None, model_dir, n_samples=8, seq_len=128, seed=0)
    other = load_calibration(None, model_dir, n_samples=8, seq_len=128, seed=1)
    assert torch.equal(calib.input_ids, again.input_ids)
    assert not torch.equal(calib.input_ids, other.input_ids)


def test_builtin_text_without_tokenizer_uses_random_ids(bare_model_dir):
    calib = load_calibration(None, bare_model_dir, n_samples=3, seq_len=50, seed=4)
    assert calib.input_ids.shape == (3, 50)
    assert int(calib.input_ids.max()) < VOCAB and int(calib.input_ids.min()) >= 0
    assert len(calib.warnings) == 1 and "tokenizer" in calib.warnings[0] and "random" in calib.warnings[0]
    assert torch.equal(calib.input_ids, load_calibration(None, bare_model_dir, 3, 50, seed=4).input_ids)


def test_builtin_with_the_default_models_tokenizer(tmp_path):
    """The built-in default model's byte vocabulary covers the built-in text."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": BYTE_VOCAB_SIZE}))
    save_byte_tokenizer(d)
    calib = load_calibration(None, d, n_samples=2, seq_len=64, seed=0)
    assert int(calib.input_ids.max()) < BYTE_VOCAB_SIZE


def test_too_few_tokens_wrap_around_and_warn(tmp_path, model_dir):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps([1, 2, 3, 4, 5]) + "\n")
    calib = load_calibration(path, model_dir, n_samples=3, seq_len=4, seed=0)
    assert calib.input_ids.shape == (3, 4)
    assert any("wrap" in w for w in calib.warnings)
    _stream_windows(calib, [1, 2, 3, 4, 5])


def test_vocab_size_override_and_no_model_dir(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps(list(range(40))) + "\n")
    calib = load_calibration(path, None, n_samples=2, seq_len=10, seed=0)
    assert any("not checked" in w for w in calib.warnings)
    with pytest.raises(MoedslError, match="vocab_size is 30"):
        load_calibration(path, None, n_samples=2, seq_len=10, seed=0, vocab_size=30)


# ------------------------------------------------------------------------------------ errors


def _error(*args, **kwargs) -> str:
    with pytest.raises(MoedslError) as err:
        load_calibration(*args, **kwargs)
    return str(err.value)


def test_bad_json_line(tmp_path, model_dir):
    path = tmp_path / "calib.jsonl"
    path.write_text("[1, 2, 3]\n[4, 5,, 6]\n")
    msg = _error(path, model_dir, 1, 4, 0)
    assert f"{path}:2:" in msg and "not valid JSON" in msg
    assert "[4, 5,, 6]" in msg  # the offending line is shown


def test_token_id_out_of_vocab(tmp_path, model_dir):
    path = tmp_path / "calib.jsonl"
    path.write_text("[1, 2, 3]\n" + json.dumps({"input_ids": [4, 5, VOCAB + 7]}) + "\n")
    msg = _error(path, model_dir, 1, 4, 0)
    assert f"{path}:2" in msg and str(VOCAB + 7) in msg and f"vocab_size is {VOCAB}" in msg
    npy = tmp_path / "calib.npy"
    arr = np.zeros((3, 5), dtype=np.int64)
    arr[2, 4] = 999
    np.save(npy, arr)
    msg = _error(npy, model_dir, 1, 4, 0)
    assert str(npy) in msg and "row 2" in msg and "999" in msg


def test_empty_files(tmp_path, model_dir):
    for name in ("empty.jsonl", "empty.txt"):
        path = tmp_path / name
        path.write_text("")
        msg = _error(path, model_dir, 1, 4, 0)
        assert name in msg and "empty" in msg
    npy = tmp_path / "empty.npy"
    np.save(npy, np.zeros(0, dtype=np.int64))
    assert "empty.npy" in _error(npy, model_dir, 1, 4, 0)


def test_unknown_tensor_name(tmp_path, model_dir):
    from safetensors.torch import save_file

    path = tmp_path / "calib.safetensors"
    save_file({"tokens": torch.arange(8), "mask": torch.ones(8, dtype=torch.int64)}, str(path))
    msg = _error(path, model_dir, 1, 4, 0)
    assert str(path) in msg and "input_ids" in msg and "mask" in msg and "tokens" in msg


def test_missing_file_and_directory(tmp_path, model_dir):
    msg = _error(tmp_path / "nope.jsonl", model_dir, 1, 4, 0)
    assert "nope.jsonl" in msg and "does not exist" in msg
    assert "is a directory" in _error(tmp_path, model_dir, 1, 4, 0)
    assert "does not exist" in _error(None, tmp_path / "no-model", 1, 4, 0)


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"ids": [1, 2]}', ["input_ids", "text"]),
        ("[1, 2.5, 3]", ["2.5", "not an integer"]),
        ("[1, -2]", ["negative"]),
        ('"just a string"', ["list of token ids"]),
        ('{"text": 5}', ["`text` must be a string"]),
    ],
)
def test_bad_jsonl_content(tmp_path, model_dir, line, words):
    path = tmp_path / "calib.jsonl"
    path.write_text("[1, 2]\n" + line + "\n")
    msg = _error(path, model_dir, 1, 2, 0)
    assert f"{path}:2" in msg
    for w in words:
        assert w in msg


def test_bad_arrays(tmp_path, model_dir):
    floats = tmp_path / "floats.npy"
    np.save(floats, np.ones(8, dtype=np.float32))
    assert "integers" in _error(floats, model_dir, 1, 4, 0)
    cube = tmp_path / "cube.npy"
    np.save(cube, np.ones((2, 2, 2), dtype=np.int64))
    assert "1-D or 2-D" in _error(cube, model_dir, 1, 4, 0)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    assert "junk.npy" in _error(junk, model_dir, 1, 4, 0)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 8)
    assert "junk.safetensors" in _error(bad_st, model_dir, 1, 4, 0)


def test_text_without_tokenizer(tmp_path, bare_model_dir):
    path = tmp_path / "notes.txt"
    path.write_text("some text")
    msg = _error(path, bare_model_dir, 1, 4, 0)
    assert "notes.txt" in msg and "tokenizer" in msg


def test_not_utf8_text(tmp_path, model_dir):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    msg = _error(path, model_dir, 1, 4, 0)
    assert "latin1.txt" in msg and "UTF-8" in msg


def test_bad_sizes(model_dir):
    assert "n_samples" in _error(None, model_dir, 0, 4, 0)
    assert "seq_len" in _error(None, model_dir, 1, -1, 0)
