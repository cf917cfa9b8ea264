"""The options of a quantization run (`moedsl quantize` and `moedsl.quantize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_serializer

from moedsl.execute.arguments import add_quantize_arguments  # re-exported; its torch-free home keeps `moedsl fmt` fast
from moedsl.gptq.quantizer import QuantConfig
from moedsl.plan.schema import Policy

__all__ = ["QuantizeOptions", "add_quantize_arguments"]


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    model: Path | None = None  # None: the built-in tiny default
    trust_remote_code: bool = False  # let the model directory's own code (auto_map) define its classes
    out: Path
    definition: str | None = None  # a .moedef file or library name; None: picked by model_type
    calib: Path | None = None
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    policy: str = "routed"
    format: Literal["gptq", "compressed-tensors"] = "gptq"
    # the serving engine the output is written for (moedsl/write/engines.py): auto warns of what vLLM
    # would not load, vllm refuses it, none writes whatever the format can store
    engine: Literal["auto", "vllm", "none"] = "auto"
    device: str = "auto"
    seed: int = 0
    resume: bool = True
    # seconds between resume states (the next layer's inputs and state.json); 0: after every layer
    resume_interval: float = 60.0
    overwrite: bool = False
    progress: bool = True
    quantize_lm_head: bool = False
    activations: Literal["auto", "device", "cpu"] = "auto"  # where layer inputs/outputs are kept between layers
    pipeline: Literal["overlap", "serial"] = "overlap"  # read/write beside the quantizer, or each step in turn
    allow_missing_weights: bool = False  # parameters absent from the checkpoint are initialized, with a warning
    allow_unused_weights: bool = False  # checkpoint tensors no parameter takes are ignored, with a warning
    # fixed blocks of each MoE layer's experts, the unit that ranks own (docs/distributed.md); None: one per rank
    # (1 in one process: the whole layer's experts in the largest batched solves)
    expert_blocks: int | None = None

    def model_post_init(self, _context) -> None:
        from moedsl.execute.option_check import check_options

        check_options(self)
    # a built-in solver's name, `file.py:Name` / `module:Name`, or a solver object (moedsl/solvers)
    solver: Any = "gptq"

    @field_serializer("solver")
    def _solver_name(self, solver: Any) -> str:  # reports and resume fingerprints record the name
        from moedsl.solvers import solver_name

        return solver_name(solver)

    def quant_config(self, scale_dtype: str = "float16") -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                           static_groups=self.static_groups, damp_percent=self.damp_percent, scale_dtype=scale_dtype)

    def moe_policy(self) -> Policy:
        return Policy.parse(self.policy)

    def fingerprint(self) -> dict:
        """What must be equal for a resumed run to continue an interrupted one."""
        # none changes the result (the remote code's own files are fingerprinted by their sha256)
        skip = {"resume", "resume_interval", "overwrite", "progress", "out", "device", "activations", "trust_remote_code", "pipeline"}
        return {k: str(v) for k, v in self.model_dump().items() if k not in skip}
