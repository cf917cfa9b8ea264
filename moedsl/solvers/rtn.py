"""Round-to-nearest: every weight to the nearest point of its group's min/max grid.

The baseline every other solver is measured against, and the right choice when no
statistics exist. Rows are independent, so all matrices of a problem are one call.
"""

from __future__ import annotations

from moedsl.gptq.quantizer import QuantResult, find_params, rtn_quantize
from moedsl.solvers import Problem


class RTN:
    name = "rtn"
    grid = staticmethod(find_params)

    def solve(self, problem: Problem) -> list[list[QuantResult]]:
        out = []
        for W in problem.weights:
            n, rows, cols = W.shape
            whole = rtn_quantize(W.reshape(n * rows, cols), problem.cfg, self.grid)
            out.append([QuantResult(weight=whole.weight[i * rows:(i + 1) * rows],
                                    codes=whole.codes[i * rows:(i + 1) * rows],
                                    scales=whole.scales[i * rows:(i + 1) * rows],
                                    zeros=whole.zeros[i * rows:(i + 1) * rows], g_idx=whole.g_idx,
                                    loss=float(((W[i] - whole.weight[i * rows:(i + 1) * rows]) ** 2).sum() / 2),
                                    damp=0.0)
                        for i in range(n)])
        return out
