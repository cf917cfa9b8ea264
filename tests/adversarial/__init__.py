"""The adversarial harness: bad inputs thrown at the real `moedsl` CLI (see case.py, runner.py)."""
