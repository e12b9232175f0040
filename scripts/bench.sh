#!/usr/bin/env bash
# The main job. On a GPU: the benchmark grid against SDPA (flash, cuDNN, mem-efficient) and FlexAttention,
# writing a table, a CSV and a PNG under benchmarks/results/. Without a GPU: a small interpreted demo that
# checks itself against the float64 reference. Usage: bash scripts/bench.sh [python -m tileattn.bench args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m tileattn.bench "$@"
