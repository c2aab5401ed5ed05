#!/usr/bin/env bash
# One command on an NVIDIA GPU machine (PyTorch with CUDA; no TensorRT or network needed):
# prints PyTorch CUDA fp32 / fp16 / bf16 / CUDA-graph latency, full and skipped chain, and ONNX
# Runtime on the CPU cores for scale. Finishes well under 8 minutes; exits cleanly without a GPU.
#   benchmarks/gpu_check.sh [CHECKPOINT] [JSON_OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "${1:-checkpoints/fmnist-pg-s.safetensors}" \
    "${2:-benchmarks/results/gpu_check.json}"
