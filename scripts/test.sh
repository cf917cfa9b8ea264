#!/usr/bin/env bash
# Sets up and runs the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
python3 -m pytest tests "$@"
