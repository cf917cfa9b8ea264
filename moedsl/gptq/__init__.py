"""GPTQ math: the quantization grid, GPTQ for one matrix, and the batched/shared MoE paths."""

from moedsl.gptq.batched import gptq_quantize_batched, gptq_quantize_shared
from moedsl.gptq.gptq import gptq_quantize
from moedsl.gptq.quantizer import (
    QuantConfig,
    QuantResult,
    dequantize,
    dequantize_codes,
    find_params,
    quantize,
    rtn_quantize,
)

__all__ = [
    "QuantConfig",
    "QuantResult",
    "dequantize",
    "dequantize_codes",
    "find_params",
    "gptq_quantize",
    "gptq_quantize_batched",
    "gptq_quantize_shared",
    "quantize",
    "rtn_quantize",
]
