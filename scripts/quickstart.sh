#!/usr/bin/env bash
# Sets up and runs the main job: quantize the built-in tiny default MoE model (offline) to ./moedsl-out.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
python3 -m moedsl quantize --out "${1:-moedsl-out}"
