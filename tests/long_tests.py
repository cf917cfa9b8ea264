"""The long run: `MOEDSL_LONG_TESTS=1 ./scripts/test.sh`.

The default suite (CI's) keeps to a budget: property tests draw a few dozen derandomized examples
each, and CLI commands run in processes forked from a preloaded server (tests/cli_process.py). The
long run draws the full example counts (hundreds per property) and runs every command as
`python -m moedsl` in a fresh interpreter. Run it before a release, or after changing the parser,
the printer or the CLI's process handling.
"""

from __future__ import annotations

import os

LONG = os.environ.get("MOEDSL_LONG_TESTS") == "1"


def examples(default: int, long: int) -> int:
    """A property test's `max_examples`: `default` in the default suite, `long` in the long run."""
    return long if LONG else default
