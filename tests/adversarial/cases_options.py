"""Bad command-line options of `moedsl quantize`."""

from __future__ import annotations

from tests.adversarial.case import Case, either, error, ok, quantize


def _q(*extra):
    return lambda ws: quantize(ws, ws.model(), *extra)


CASES = [
    Case("batch-size-zero", "options", _q("--batch-size", "0"), error("--batch-size", "0")),
    Case("batch-size-negative", "options", _q("--batch-size", "-3"), error("--batch-size", "-3")),
    Case("batch-size-huge", "options", _q("--batch-size", "100000000000000000000"), either("--batch-size")),
    Case("seed-20-digits", "options", _q("--seed", "12345678901234567890123"), error("--seed", "12345678901234567890123")),
    Case("seed-negative", "options", _q("--seed", "-1"), either("--seed")),
    Case("samples-zero", "options", _q("--samples", "0"), error("--samples", "0")),
    Case("seq-len-negative", "options", _q("--seq-len", "-32"), error("--seq-len", "-32")),
    Case("tokens-cannot-fit", "options", _q("--samples", "1000000000", "--seq-len", "1000000000"),
         error("--samples", "--seq-len", "1000000000")),
    Case("tokens-too-many-for-memory", "options", _q("--samples", "200000", "--seq-len", "100000"),
         error("--samples", "200000"), fresh=True),
    Case("seq-len-above-positions", "options", _q("--seq-len", "1000", "--samples", "1"), either("--seq-len")),
    Case("policy-auto-huge-min-tokens", "options", _q("--policy", "auto(min_tokens=" + "9" * 40 + ")"),
         error("--policy", "min_tokens")),
    Case("policy-garbage", "options", _q("--policy", "sometimes"), error("--policy", "sometimes")),
    Case("policy-topk-zero", "options", _q("--policy", "topk=0"), error("--policy", "topk=0")),
    Case("policy-topk-above-experts", "options", _q("--policy", "topk=99"), error("topk=99")),
    Case("device-meta", "options", _q("--device", "meta"), error("--device", "meta")),
    Case("device-tpu", "options", _q("--device", "tpu"), error("--device", "tpu")),
    Case("device-cuda-absent", "options", _q("--device", "cuda:7"), either("--device", "cuda:7")),
    Case("bits-nine", "options", _q("--bits", "9"), error("--bits", "9")),
    Case("group-size-zero", "options", _q("--group-size", "0"), error("--group-size", "0")),
    Case("group-size-not-dividing", "options", _q("--group-size", "48"), error("48")),
    Case("damp-nan", "options", _q("--damp", "nan"), error("--damp", "nan")),
    Case("damp-negative", "options", _q("--damp", "-1"), error("--damp", "-1")),
    Case("def-missing-file", "options", _q("--def", "nowhere.moedef"), error("nowhere.moedef")),
    Case("def-other-arch", "options", _q("--def", "mixtral"), error("mixtral")),
]
