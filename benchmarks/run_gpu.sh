#!/usr/bin/env bash
# Every GPU measurement of `mamlpp bench`, JSON under $OUT (default benchmarks/results).
# Needs a CUDA build of torch in $PYTHON (default: .venv/bin/python if present, else python3).
# Extra arguments go to benchmarks/run_gpu.py (e.g. --quick, --iters 20, --variant NAME=k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
  "no CUDA GPU visible to torch " + torch.__version__ + "; install a CUDA build of torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" \
  2>/dev/null || true
exec "$PYTHON" benchmarks/run_gpu.py --out-dir "$OUT" "$@"
