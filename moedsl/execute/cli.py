"""`moedsl quantize`: argparse namespace → QuantizeOptions → run."""

from __future__ import annotations

from moedsl.execute import distributed
from moedsl.execute.options import QuantizeOptions
from moedsl.execute.run import quantize


def run_quantize(args) -> int:
    with distributed.exit_on_failure():  # under torchrun: a failing rank ends at once, saying which it was
        fields = QuantizeOptions.model_fields
        opts = QuantizeOptions(**{k: v for k, v in vars(args).items() if k in fields})
        from moedsl import LAUNCHED

        report = quantize(options=opts, launched=LAUNCHED)
    if not distributed.init(opts.device).main:
        return 0  # rank 0 says what was written
    print(f"wrote {opts.out} ({report.arch}, {len(report.layers)} layers, {report.seconds:.1f} s)")
    return 0
