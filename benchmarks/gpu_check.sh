#!/usr/bin/env bash
# One command on an NVIDIA GPU machine (PyTorch with CUDA; no TensorRT or network needed):
# prints PyTorch CUDA fp32 / fp16 / bf16 / CUDA-graph latency, full and skipped chain, and ONNX
# Runtime on the CPU cores for scale. Finishes well under 8 minutes; exits cleanly without a GPU.
# Writes JSON_OUT only when given (e.g. benchmarks/results/gpu_check.json).
#   benchmarks/gpu_check.sh [CHECKPOINT] [JSON_OUT]
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "${1:-checkpoints/fmnist-pg-s.safetensors}" ${2:+"$2"}
