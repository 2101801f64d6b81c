#!/usr/bin/env bash
# Idempotent set-up: a virtual environment at .venv with the CPU build of torch installed first (an open
# torch requirement would otherwise pull a multi-GB CUDA build), then the project with its test extras.
# On a GPU machine set TORCH_SPEC to the build you want, e.g. TORCH_SPEC="torch==2.13.0" with CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.spectral-dist-installed
want="$(cat pyproject.toml | sha1sum | cut -c1-12)-$TORCH_SPEC"
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, spectral_dist; print('spectral-dist ready: torch', torch.__version__)"
echo "$want" > "$stamp"
