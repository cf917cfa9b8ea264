"""Checks of a run's options that need no model: each error names the option and the user's value.

Names are the command line's (`--batch-size`); the library API takes the same options as
`QuantizeOptions` fields (`batch_size`).
"""

from __future__ import annotations

import os

from moedsl.errors import MoedslError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
MAX_TOKENS = 2**40  # far beyond any calibration set; larger products overflow index arithmetic


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _positive(opts, field: str) -> None:
    v = getattr(opts, field)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MoedslError(f"{_flag(field)} {v}: must be a positive integer")


def check_options(opts) -> None:
    """Refuse option values no run can use, before anything is loaded."""
    for field in ("samples", "seq_len", "batch_size", "expert_blocks"):
        if field == "expert_blocks" and opts.expert_blocks is None:
            continue  # one block per rank, decided when the ranks are known
        _positive(opts, field)
        if getattr(opts, field) > MAX_TOKENS:
            raise MoedslError(f"{_flag(field)} {getattr(opts, field)}: more than any run can hold ({MAX_TOKENS:.3g})")
    lo, hi = SEED_RANGE
    if not lo <= opts.seed <= hi:
        raise MoedslError(f"--seed {opts.seed}: out of range; a seed is an integer in [{lo}, {hi}]")
    tokens = opts.samples * opts.seq_len
    if tokens > MAX_TOKENS:
        raise MoedslError(f"--samples {opts.samples} × --seq-len {opts.seq_len} = {tokens:.3g} calibration tokens: "
                          f"more than the {MAX_TOKENS:.3g} any run can hold",
                          notes=["a few hundred thousand tokens calibrate well (e.g. --samples 256 --seq-len 2048)"])
    try:
        opts.quant_config()
    except MoedslError as err:
        field = next((f for f in _QUANT_FLAGS if f"{f}:" in err.message), None)
        if field is None:
            raise
        raise MoedslError(f"{_QUANT_FLAGS[field]} {getattr(opts, field)}: "
                          f"{err.message.split(f'{field}: ', 1)[1]}") from None
    if not opts.resume_interval >= 0:  # also refuses NaN
        raise MoedslError(f"--resume-interval {opts.resume_interval}: a number of seconds, 0 or more "
                          "(0: a resume state after every layer)")
    check_device_name(opts.device)
    try:
        policy = opts.moe_policy()
    except MoedslError as err:
        raise MoedslError(f"--policy {opts.policy}: {err.message}", expected=err.expected) from None
    for what, n in (("min_tokens", policy.min_tokens), ("topk", policy.top_k)):
        if n is not None and n > MAX_TOKENS:
            raise MoedslError(f"--policy {opts.policy}: {what} {n:.3g} is beyond any calibration set "
                              f"(at most {MAX_TOKENS:.3g})")


_QUANT_FLAGS = {"bits": "--bits", "group_size": "--group-size", "damp_percent": "--damp"}


def check_device_name(name: str) -> None:
    import re

    if name == "auto" or name == "cpu" or re.fullmatch(r"cuda(:\d+)?", name):
        return
    raise MoedslError(f"--device {name}: not a device moedsl runs on", expected=["auto", "cpu", "cuda", "cuda:N"])


def host_memory_available() -> int | None:
    """Bytes of host memory available now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_token_memory(opts, hidden_size: int, dtype_bytes: int = 4) -> None:
    """The calibration activations (a layer's inputs and outputs, and the token ids) must fit in host memory;
    checked before anything is allocated."""
    tokens = opts.samples * opts.seq_len
    need = tokens * (2 * hidden_size * dtype_bytes + 8)
    have = host_memory_available()
    if have is not None and need > have:
        raise MoedslError(
            f"--samples {opts.samples} × --seq-len {opts.seq_len} = {tokens} calibration tokens need about "
            f"{need / 2**30:.1f} GiB for a layer's activations (hidden_size {hidden_size}), but {have / 2**30:.1f} "
            "GiB of host memory is available",
            notes=["lower --samples or --seq-len"])
