#!/usr/bin/env bash
# Run the test suite. On a machine without a GPU the kernels run in Triton's interpreter (small shapes);
# with CUDA present the same tests use large shapes, bf16/fp16 and the 500-config sweep.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
workers=2
if "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then workers=4; fi
if "$PY" -c 'import xdist' >/dev/null 2>&1; then par=(-n "$workers"); else par=(); fi
exec "$PY" -m pytest tests -q "${par[@]}" "$@"
