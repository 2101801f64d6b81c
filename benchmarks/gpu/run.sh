#!/usr/bin/env bash
# Every GPU check of issue 16 in one command, under 8 minutes on one H100/H200; nothing is installed or
# downloaded (the repository on PYTHONPATH and an installed torch are all it needs).
#
#   bash benchmarks/gpu/run.sh                      # CUDA: writes benchmarks/gpu/results/<device>-<time>.{json,md}
#   bash benchmarks/gpu/run.sh --device cpu --quick # the dry run a CPU test runs (seconds)
#
# Checks: (0) host syncs in one optimizer step (CUDA's sync debug mode; at most 1, for 5 and 17 matrices);
# (0b) the step's transient memory (the allocator's peak) with batches unbounded and capped, against AdamW and Muon;
# (1) step overhead at GPT-2-small and ViT-B/16 shapes (optimizer step; full step at 4k, 16k and 64k
# tokens) against torch AdamW (foreach) and a batched Muon; (2) every basis against the CPU float64 SVD
# reference (errors, FLOPs, ms per matrix); (3) the cost of the eigenbasis's Jacobi steps (jacobi_steps 0, 1,
# 2; both QRs); (4) a short GPT-2-small training run on the standard library's source bytes: SpectralNewton
# (default basis) against AdamW and Muon; (5) if 150 s of the budget are left, every basis along a real run's
# recorded inputs (basis_accuracy.py --real).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "benchmarks/gpu/run.sh: '$PY' cannot import torch; set PYTHON to an interpreter that can" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu/run.py "$@"
