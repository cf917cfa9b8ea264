#!/usr/bin/env bash
# Installs moedsl and its CPU dependencies into the current Python (torch pinned to the CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements/cpu.txt
python3 -m pip install -q --no-deps -e .
