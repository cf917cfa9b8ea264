"""CUDA-only speedups against the plain path. Skipped where there is no GPU (CI); run on the H100.

- the block kernel (Gluon) reproduces the torch column loop bit for bit (single, shared and batched solves,
  short last blocks, outputs stored in place or copied);
- the glu experts' silu(gate) ⊙ up kernel gives torch's values to the bit;
- GPTQ on CUDA agrees with GPTQ on the CPU to fp32 rounding (a few codes may flip by one step);
- its lazy updates on tensor cores (3×TF32) agree with the plain fp32 product the same way;
- the fast MoE layer path equals the unbatched path on CUDA, to fp32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from moedsl.gptq.batched import gptq_quantize_batched, gptq_quantize_shared
from moedsl.gptq.block import HAVE_TRITON
from moedsl.gptq.gptq import gptq_quantize
from moedsl.gptq.quantizer import QuantConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = [
    dict(bits=4, group_size=128),
    dict(bits=4, group_size=32, sym=False),
    dict(bits=3, group_size=-1, act_order=True),
    dict(bits=8, group_size=64, act_order=True, static_groups=True),
    dict(bits=2, group_size=128, act_order=True),
]


def _problem(b: int, rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(b, rows, cols, generator=g)
    X = torch.randn(b, 4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    H = 2 * X.transpose(1, 2) @ X / X.shape[1]
    return W.cuda(), H.cuda()


def _solve(fn, *args, triton: bool):
    old = os.environ.get("MOEDSL_NO_TRITON")
    os.environ["MOEDSL_NO_TRITON"] = "0" if triton else "1"
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop("MOEDSL_NO_TRITON")
        else:
            os.environ["MOEDSL_NO_TRITON"] = old


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("kw", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_triton_kernel_equals_torch_loop(kw):
    cfg = QuantConfig(**kw)
    W, H = _problem(3, 96, 256, seed=1)
    single_t = _solve(gptq_quantize, W[0], H[0], cfg, triton=True)
    single_p = _solve(gptq_quantize, W[0], H[0], cfg, triton=False)
    assert torch.equal(single_t.codes, single_p.codes)
    assert torch.equal(single_t.weight, single_p.weight)
    batch_t = _solve(gptq_quantize_batched, W, H, cfg, triton=True)
    batch_p = _solve(gptq_quantize_batched, W, H, cfg, triton=False)
    for a, b in zip(batch_t, batch_p):
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scales, b.scales)
    shared_t = _solve(gptq_quantize_shared, W, H[0], cfg, triton=True)
    for a, b in zip(shared_t, [single_t]):
        assert torch.equal(a.codes, b.codes)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("cols", [200, 40])
def test_triton_kernel_equals_torch_loop_on_a_short_last_block(cols):
    """A last block narrower than the rest (200 = 128 + 72 columns; 40 < one block), rows that do not fill
    the kernel's programs (77), and the block kernel's own outputs compared with the loop's: codes, weights,
    errors' effect (the later columns) and the losses, to the bit."""
    cfg = QuantConfig(bits=4, group_size=-1)
    W, H = _problem(2, 77, cols, seed=3)
    for fn, h in ((gptq_quantize_batched, H), (gptq_quantize_shared, H[0])):
        fast = _solve(fn, W, h, cfg, triton=True)
        ref = _solve(fn, W, h, cfg, triton=False)
        for a, b in zip(fast, ref):
            assert torch.equal(a.codes, b.codes)
            assert torch.equal(a.weight, b.weight)
            assert a.loss == b.loss


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("cols", [128, 72])
def test_triton_kernel_writes_the_split_errors_the_torch_loop_gives(cols):
    """The block kernel's errors in the split update's layout ([E_hi | E_hi | E_lo], lazy.py) are, to the bit,
    `split_errors` of the torch loop's errors; and its plain errors are the loop's."""
    from moedsl.gptq.block import solve_block
    from moedsl.gptq.lazy import split_errors

    W, H = _problem(2, 77, cols, seed=4)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = W.abs().amax(dim=2, keepdim=True).expand_as(W) / 7
    zero = torch.full_like(W, 8.0)
    ref = _solve(solve_block, W, U, scale, zero, 15, False, triton=False)
    for split in (False, True):
        fast = _solve(solve_block, W, U, scale, zero, 15, split, triton=True)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]) and torch.equal(fast[3], ref[3])
        assert torch.equal(fast[2], split_errors(ref[2]) if split else ref[2])


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_triton_kernel_stores_into_the_outputs_it_is_given():
    """`out` views with contiguous rows (the solve's column-major outputs) are stored into by the kernel; row-major
    ones get a copy: both hold the torch loop's values, and are what solve_block returns."""
    from moedsl.gptq.block import solve_block

    W, H = _problem(2, 77, 200, seed=5)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = W.abs().amax(dim=2, keepdim=True).expand_as(W) / 7
    zero = torch.full_like(W, 8.0)
    ref = _solve(solve_block, W[..., 64:192], U[:, 64:192, 64:192], scale[..., 64:192], zero[..., 64:192], 15,
                 triton=False)
    for column_major in (True, False):
        shape = (2, 200, 77) if column_major else (2, 77, 200)
        Q = torch.full(shape, -1.0, device="cuda")
        C = torch.zeros(shape, dtype=torch.uint8, device="cuda")
        if column_major:
            Q, C = Q.transpose(1, 2), C.transpose(1, 2)
        out = (Q[..., 64:192], C[..., 64:192])
        fast = _solve(solve_block, W[..., 64:192], U[:, 64:192, 64:192], scale[..., 64:192], zero[..., 64:192], 15,
                      True, out, triton=True)
        assert fast[0] is out[0] and fast[1] is out[1]
        assert torch.equal(Q[..., 64:192], ref[0]) and torch.equal(C[..., 64:192], ref[1])
        assert bool((Q[..., :64] == -1).all()) and bool((Q[..., 192:] == -1).all())  # nothing outside the block


def test_silu_mul_kernel_equals_torch():
    """silu(gate) ⊙ up in one kernel against F.silu(gate) * up, to the bit, for every bf16 bit pattern of gate
    (subnormals, infinities and NaN among them), each with three values of up."""
    import torch.nn.functional as F

    from moedsl.experts.silu_mul import HAVE_TRITON as kernel, silu_mul

    if not kernel:
        pytest.skip("needs Triton")
    g = torch.Generator().manual_seed(7)
    gate = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).repeat(3)
    up = torch.randn(gate.shape, generator=g).bfloat16()
    gate, up = gate.reshape(3, -1, 4).cuda(), up.reshape(3, -1, 4).cuda()
    fast = _solve(silu_mul, gate, up, triton=True)
    torch.testing.assert_close(fast, F.silu(gate) * up, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kw", CONFIGS[:3], ids=[str(c) for c in CONFIGS[:3]])
def test_cuda_matches_cpu(kw):
    cfg = QuantConfig(**kw)
    W, H = _problem(1, 128, 256, seed=2)
    gpu = gptq_quantize(W[0], H[0], cfg)
    cpu = gptq_quantize(W[0].cpu(), H[0].cpu(), cfg)
    flipped = (gpu.codes.cpu() != cpu.codes).float().mean().item()
    print(f"{kw}: {flipped:.2e} of codes differ between CUDA and CPU")
    assert flipped < 1e-2
    rel = ((gpu.weight.cpu() - cpu.weight).norm() / cpu.weight.norm()).item()
    assert rel < 2e-2


@pytest.mark.parametrize("kw", CONFIGS[:3], ids=[str(c) for c in CONFIGS[:3]])
def test_tensor_core_updates_equal_fp32_updates(kw, monkeypatch):
    """The 3×TF32 lazy updates (moedsl/gptq/lazy.py) against the plain fp32 product, on the single,
    shared and batched paths: the same codes but for a rare one-step flip, the same loss to 1e-4."""
    cfg = QuantConfig(**kw)
    W, H = _problem(3, 256, 512, seed=3)
    runs = {}
    for fp32 in ("1", "0"):
        monkeypatch.setenv("MOEDSL_FP32_UPDATES", fp32)
        runs[fp32] = ([gptq_quantize(W[0], H[0], cfg)], gptq_quantize_batched(W, H, cfg),
                      gptq_quantize_shared(W, H[0], cfg))
    for plain, fast in zip(runs["1"], runs["0"]):
        for a, b in zip(plain, fast):
            flipped = (a.codes != b.codes).float().mean().item()
            assert flipped < 1e-3, flipped
            assert (a.codes.int() - b.codes.int()).abs().max() <= 1
            assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss)


def test_fast_moe_layer_equals_unbatched_on_cuda():
    from bench.moe_layer import main

    out = main(["--small", "--device", "cuda"])
    print(out)
    # bit-identical on the CPU (tests/test_bench.py); on CUDA only fp32 rounding of differently-shaped
    # matmuls separates them: a handful of codes one step apart
    assert out["weights_differing"] <= 1e-3 * out["weights_total"]


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=128), dict(bits=2, group_size=64, sym=False)])
def test_report_error_on_cuda_agrees_with_cpu(cfg):
    """The report's output error runs its products on bf16 tensor cores on CUDA, in fp32 on the CPU."""
    from moedsl.execute.solving import output_error
    from moedsl.gptq.quantizer import rtn_quantize

    W, H = _problem(6, 384, 512, seed=3)
    W = W.bfloat16()
    config = QuantConfig(**cfg)
    Q = rtn_quantize(W.float().reshape(-1, 512), config).weight.reshape(W.shape) + 1e-3 * torch.randn_like(W.float())
    gpu = output_error(W, Q, H, config)
    cpu = output_error(W.cpu(), Q.cpu(), H.cpu(), config)
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=2e-3, atol=0)


def test_stored_format_dequantization_on_cuda_equals_cpu():
    """FP8 and MXFP4 source weights decode to the same bits on the device as on the CPU."""
    from moedsl.execute.dequant import fp8_block_dequantize, mxfp4_dequantize
    from moedsl.models.stored_formats import fp8_block_quantize, mxfp4_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 576, 7168 // 8, generator=g) * 0.02  # partial 128-row blocks, as kv_a_proj_with_mqa
    q, s = fp8_block_quantize(w, (128, 128))
    cpu = fp8_block_dequantize(q, s, (128, 128))
    assert torch.equal(fp8_block_dequantize(q.cuda(), s.cuda(), (128, 128)).cpu(), cpu)
    b, sc = mxfp4_quantize(w[..., :512])
    assert torch.equal(mxfp4_dequantize(b.cuda(), sc.cuda()).cpu(), mxfp4_dequantize(b, sc))


def test_overlap_serial_and_resume_write_the_same_bytes_on_cuda(tiny_model, tmp_path):
    """On a GPU the resume state's activations leave the device on a copy stream of their own, into pinned
    memory: an overlapped run, a step-by-step run and a run killed while a background write is in flight
    and then resumed write the same checkpoint."""
    import subprocess
    import sys

    import moedsl
    from tests.test_pipeline import ARGS, RUN, assert_same_checkpoint

    def cli(*args, env=None):  # a process of its own (the forked test server must not inherit a CUDA context)
        return subprocess.run([sys.executable, "-m", "moedsl", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})

    model = tiny_model("qwen3_moe", num_hidden_layers=3)
    overlapped, serial, killed = tmp_path / "overlap", tmp_path / "serial", tmp_path / "killed"
    moedsl.quantize(model=model, out=overlapped, pipeline="overlap", device="cuda", **RUN)
    moedsl.quantize(model=model, out=serial, pipeline="serial", device="cuda", **RUN)
    assert_same_checkpoint(serial, overlapped)
    args = ["quantize", "--model", str(model), "--out", str(killed), "--device", "cuda", *ARGS]
    r = cli(*args, env={"MOEDSL_KILL_IN_WRITE": "1:acts"})
    assert r.returncode == -9, r.stderr[-2000:]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_checkpoint(killed, overlapped)


def test_head_quantized_after_the_embeddings_and_head_waited_in_host_memory(tiny_model, tmp_path):
    """On a GPU the embeddings and lm_head leave the device after the calibration capture and come back
    for --quantize-lm-head at the end: the head is quantized there from the last layer's outputs, and
    the layers' peak memory holds neither."""
    import math

    import moedsl
    from tests.test_pipeline import RUN

    model = tiny_model("qwen3_moe", num_hidden_layers=2)
    report = moedsl.quantize(model=model, out=tmp_path / "head", device="cuda", quantize_lm_head=True, **RUN)
    assert math.isfinite(report.head["error"]) and report.head["error"] <= report.head["rtn_error"]
    assert report.head["tokens"] == RUN["samples"] * RUN["seq_len"]


def test_report_names_the_phases_that_raised_the_peak(tiny_model, tmp_path):
    """On a GPU the report says which phases (statistics and solves per stage) raised the device's peak:
    every figure of the layer loop is one a layer's peak bounds, and the phases that load and measure a
    layer are among them."""
    import json

    import moedsl
    from moedsl.execute.outdir import REPORT_NAME
    from tests.test_pipeline import RUN

    model = tiny_model("qwen3_moe", num_hidden_layers=2)
    moedsl.quantize(model=model, out=tmp_path / "q", device="cuda", **RUN)
    report = json.loads((tmp_path / "q" / REPORT_NAME).read_text())
    peaks = report["phase_peak_gpu_gib"]
    assert peaks and any(k.startswith("statistics.") for k in peaks) and "read" in peaks
    layer_peak = max(layer["peak_gpu_bytes"] for layer in report["layers"]) / 2**30
    for phase, gib in peaks.items():
        if not phase.startswith("startup"):
            assert 0 < gib <= layer_peak + 2e-3, (phase, gib, layer_peak)


@pytest.mark.parametrize("batched", [False, True])
def test_half_precision_gram_added_in_the_product_equals_fp32_on_cpu(batched):
    """Hessian statistics from bf16 rows on CUDA (the products on tensor cores, added into the fp32
    accumulator by the product itself) against the CPU's fp32 products, over several additions."""
    from moedsl.execute import stats

    g = torch.Generator().manual_seed(6)
    shape = (5, 3000, 384) if batched else (3000, 384)
    xs = [torch.randn(*shape, generator=g).bfloat16() for _ in range(3)]
    acc_gpu = torch.zeros(*shape[:-2], 384, 384, device="cuda")
    acc_cpu = torch.zeros(*shape[:-2], 384, 384)
    for x in xs:
        stats.accumulate_gram(acc_gpu, x.cuda())
        stats.accumulate_gram(acc_cpu, x)
    assert stats._ACCUMULATING_PRODUCTS[0], "this torch has no bf16 addmm/baddbmm into fp32"
    rel = ((acc_gpu.cpu() - acc_cpu).abs().max() / acc_cpu.abs().max()).item()
    assert rel < 1e-5, rel
