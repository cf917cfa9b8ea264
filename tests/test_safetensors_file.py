"""moedsl's safetensors writer writes the file safetensors' own `save_file` writes, byte for byte."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moedsl.errors import MoedslError
from moedsl.write.safetensors_file import write_safetensors

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
          torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
          torch.float4_e2m1fn_x2]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype in (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu):  # no casts to them: any byte
        shape = shape or (1,)  # (a 0-d F4 would hold half a byte)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8).view(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 100, shape, generator=g, dtype=torch.int64).to(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g, dtype=torch.int64).to(dtype)


names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
entries = st.dictionaries(names, st.tuples(st.sampled_from(DTYPES), shapes, st.integers(0, 10**6)), min_size=1,
                          max_size=12)
metadatas = st.one_of(st.none(), st.just({}), st.just({"format": "pt"}))


@settings(max_examples=60, deadline=None)
@given(entries, metadatas)
def test_same_bytes_as_save_file(tmp_path_factory, spec, metadata):
    d = tmp_path_factory.mktemp("st")
    tensors = {name: _tensor(dtype, shape, seed) for name, (dtype, shape, seed) in spec.items()}
    save_file(tensors, str(d / "theirs.safetensors"), metadata=metadata)
    write_safetensors(d / "ours.safetensors", tensors, metadata)
    assert (d / "ours.safetensors").read_bytes() == (d / "theirs.safetensors").read_bytes()


def test_views_of_one_buffer_and_strided_tensors(tmp_path):
    """What the packer hands over: views into one host buffer (save_file refuses shared storage), and a
    transposed tensor, written as its values."""
    buffer = torch.arange(64, dtype=torch.uint8)
    tensors = {"a.qweight": buffer[:32].view(torch.int32).view(2, 4), "a.scales": buffer[32:48].view(torch.bfloat16),
               "b.t": torch.arange(6.0).view(2, 3).t()}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_refuses_what_safetensors_cannot_hold(tmp_path):
    with pytest.raises(MoedslError, match="cannot write `c` to .*x.safetensors: safetensors has no dtype for "
                                          "torch.complex128"):
        write_safetensors(tmp_path / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(MoedslError, match="cannot write `m` to .*y.safetensors: it is on meta, not on the CPU"):
        write_safetensors(tmp_path / "y.safetensors", {"m": torch.zeros(2, device="meta")})
    half_byte = torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(MoedslError, match="cannot write `f` to .*z.safetensors: a 0-d float4 tensor"):
        write_safetensors(tmp_path / "z.safetensors", {"f": half_byte})
