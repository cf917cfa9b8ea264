"""Bad calibration files."""

from __future__ import annotations

import json

from tests.adversarial.case import Case, either, error, ok, quantize


def _calib(name, content):
    def build(ws):
        return quantize(ws, ws.model(), "--calib", str(ws.file(name, content)))
    return build


def _npy(name, make):
    def build(ws):
        import numpy as np

        path = ws.root / name
        np.save(path, make(np), allow_pickle=True)
        return quantize(ws, ws.model(), "--calib", str(path))
    return build


def _safetensors(name, tensors):
    def build(ws):
        from safetensors.torch import save_file

        path = ws.root / name
        save_file(tensors(), str(path))
        return quantize(ws, ws.model(), "--calib", str(path))
    return build


def _ids(n=200):
    return [i % 300 for i in range(n)]


def _torch():
    import torch

    return torch


CASES = [
    Case("calib-jsonl-ok", "calibration", _calib("c.jsonl", json.dumps(_ids()) + "\n"), ok()),
    Case("calib-text-ok", "calibration", _calib("c.txt", "The quick brown fox. " * 50), ok()),
    Case("calib-jsonl-deep-nesting", "calibration", _calib("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
         error("deep.jsonl:1"), fresh=True),
    Case("calib-jsonl-deep-object", "calibration", _calib("deepobj.jsonl", '{"a":' * 50_000 + "1" + "}" * 50_000),
         error("deepobj.jsonl:1")),
    Case("calib-jsonl-5000-digit-int", "calibration", _calib("big.jsonl", "[1, " + "9" * 5000 + "]\n"),
         error("big.jsonl:1")),
    Case("calib-jsonl-huge-id", "calibration", _calib("huge.jsonl", "[1, " + "9" * 30 + "]\n"), error("huge.jsonl")),
    Case("calib-jsonl-float", "calibration", _calib("f.jsonl", "[1, 2.5]\n"), error("f.jsonl:1")),
    Case("calib-jsonl-nan", "calibration", _calib("nan.jsonl", "[1, NaN]\n"), error("nan.jsonl:1")),
    Case("calib-jsonl-negative", "calibration", _calib("neg.jsonl", "[1, -4]\n"), error("neg.jsonl:1")),
    Case("calib-jsonl-above-vocab", "calibration", _calib("v.jsonl", "[1, 5000]\n"), error("v.jsonl:1", "5000")),
    Case("calib-jsonl-empty", "calibration", _calib("e.jsonl", ""), error("e.jsonl")),
    Case("calib-jsonl-empty-lists", "calibration", _calib("el.jsonl", "[]\n[]\n"), error("el.jsonl")),
    Case("calib-jsonl-broken", "calibration", _calib("b.jsonl", "[1, 2\n"), error("b.jsonl:1")),
    Case("calib-jsonl-text-not-string", "calibration", _calib("t.jsonl", '{"text": 5}\n'), error("t.jsonl:1")),
    Case("calib-jsonl-bad-utf8", "calibration", _calib("u.jsonl", b"[1, 2]\n[3, \xff]\n"), error("u.jsonl:2")),
    Case("calib-jsonl-nul-bytes", "calibration", _calib("z.jsonl", b"\x00" * 64), error("z.jsonl")),
    Case("calib-text-not-utf8", "calibration", _calib("l1.txt", "caf\u00e9 ol\u00e9\n".encode("latin-1") * 20),
         error("l1.txt:1:4")),
    Case("calib-text-named-npy", "calibration", _calib("words.npy", "these are words, not an array\n"),
         error("words.npy", "not a .npy")),
    Case("calib-npy-pickled-objects", "calibration", _npy("obj.npy", lambda np: np.array([{"a": 1}], dtype=object)),
         error("obj.npy")),
    Case("calib-npy-float", "calibration", _npy("fl.npy", lambda np: np.ones((4, 40), dtype=np.float32)),
         error("fl.npy", "float32")),
    Case("calib-npy-3d", "calibration", _npy("d3.npy", lambda np: np.ones((2, 2, 40), dtype=np.int64)),
         error("d3.npy")),
    Case("calib-npy-uint64-huge", "calibration",
         _npy("u64.npy", lambda np: np.array([1, 2**64 - 1], dtype=np.uint64)), error("u64.npy")),
    Case("calib-npy-ok", "calibration", _npy("ok.npy", lambda np: np.arange(200, dtype=np.int32) % 300), ok()),
    Case("calib-npy-truncated", "calibration", _calib("tr.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_"),
         error("tr.npy")),
    Case("calib-safetensors-garbage", "calibration", _calib("g.safetensors", b"\x01" * 100), error("g.safetensors")),
    Case("calib-safetensors-float", "calibration",
         _safetensors("fl.safetensors", lambda: {"input_ids": _torch().ones(2, 40)}), error("fl.safetensors")),
    Case("calib-safetensors-two-tensors", "calibration",
         _safetensors("two.safetensors", lambda: {"a": _torch().ones(2, 40, dtype=_torch().int64),
                                                  "b": _torch().ones(2, dtype=_torch().int64)}),
         error("two.safetensors", "input_ids")),
    Case("calib-is-directory", "calibration", lambda ws: quantize(ws, ws.model(), "--calib", str(ws.root)),
         error("directory")),
    Case("calib-missing", "calibration", lambda ws: quantize(ws, ws.model(), "--calib", str(ws.root / "no.jsonl")),
         error("no.jsonl")),
]
