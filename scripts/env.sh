# Sourced by scripts/test.sh and scripts/bench.sh: picks a Python that has torch + triton, creating one if needed.
#  - A machine whose python3 already has torch and triton (the GPU image) uses it as is: nothing is installed.
#  - Otherwise a virtual environment .venv is created with the CPU build of torch and triton 3.6.0
#    (numpy < 2.4: triton 3.6's interpreter breaks with numpy >= 2.4).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -n "${TILEATTN_PYTHON:-}" ]; then
  PY="$TILEATTN_PYTHON"
elif python3 -c 'import torch, triton, pytest; assert torch.cuda.is_available()' >/dev/null 2>&1; then
  PY=python3
else
  if ! "$ROOT/.venv/bin/python" -c 'import torch, triton, pytest, xdist' >/dev/null 2>&1; then
    echo "[tileattn] creating $ROOT/.venv (torch 2.13.0 CPU, triton 3.6.0, numpy<2.4, pytest)" >&2
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check \
      torch==2.13.0 triton==3.6.0 'numpy<2.4' pytest pytest-xdist tqdm >&2
  fi
  PY="$ROOT/.venv/bin/python"
fi
