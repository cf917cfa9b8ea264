"""The adversarial harness (tests/adversarial) in CI: every case, run as a real CLI process, is handled."""

from __future__ import annotations

from tests.adversarial.runner import all_cases, describe, run_cases, summary


def test_every_adversarial_case_is_handled():
    results = run_cases(all_cases())
    failed = [describe(c, r, p) for c, r, p in results if p]
    print(summary(results))
    assert not failed, summary(results) + "\n" + "\n".join(failed)
