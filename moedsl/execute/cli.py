"""`moedsl quantize`: argparse namespace → QuantizeOptions → run."""

from __future__ import annotations

from moedsl.execute.options import QuantizeOptions
from moedsl.execute.run import quantize


def run_quantize(args) -> int:
    fields = QuantizeOptions.model_fields
    opts = QuantizeOptions(**{k: v for k, v in vars(args).items() if k in fields})
    from moedsl import LAUNCHED

    report = quantize(options=opts, launched=LAUNCHED)
    print(f"wrote {opts.out} ({report.arch}, {len(report.layers)} layers, {report.seconds:.1f} s)")
    return 0
