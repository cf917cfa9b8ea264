"""Checkpoint writers: GPTQ (qweight/qzeros/scales/g_idx) and compressed-tensors pack-quantized.

See docs/formats.md for both layouts tensor by tensor.
"""

from moedsl.write.checkpoint import CheckpointWriter, required_scale_dtype
from moedsl.write.compressed_tensors import ct_quantization_config, ct_tensors
from moedsl.write.gptq_format import gptq_quantize_config, gptq_tensors
from moedsl.write.pack import pack, unpack

__all__ = [
    "CheckpointWriter",
    "ct_quantization_config",
    "ct_tensors",
    "gptq_quantize_config",
    "gptq_tensors",
    "pack",
    "required_scale_dtype",
    "unpack",
]
