#!/usr/bin/env bash
# The test command's check that GPU workers build: `cargo check` of the worker
# with the `cuda` feature, which compiles candle's CUDA kernels with nvcc from
# PyPI (deploy/cuda/env.sh) and type-checks every CUDA path of candle and the
# worker. Linking needs libcuda from an NVIDIA driver (or the stub in NVIDIA's
# devel images, as deploy/gpu.Dockerfile uses), which this machine lacks, so
# the check stops short of a binary. Without PyPI it prints SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
started=$SECONDS
# shellcheck source=deploy/cuda/env.sh
if ! source deploy/cuda/env.sh; then
  if ! python3 -m pip download --no-deps -q -d "$(mktemp -d)" six >/dev/null 2>&1; then
    echo "=== SKIPPED: the CUDA build check needs nvcc from PyPI, which cannot be reached ==="
    exit 0
  fi
  echo "cuda: installing nvcc from PyPI failed" >&2
  exit 1
fi
cargo check --quiet -p ps-worker --features cuda
echo "cuda: the worker with the cuda feature checks (kernels for compute capability $CUDA_COMPUTE_CAP) in $((SECONDS - started)) s"
