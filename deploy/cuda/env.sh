#!/usr/bin/env bash
# Sourced, not run: puts a CUDA compiler on PATH for candle's `cuda` feature
# without any system CUDA install. NVIDIA publishes nvcc, the runtime headers
# and the C++ core library the headers include (`nvidia-cuda-nvcc`,
# `nvidia-cuda-runtime`, `nvidia-cuda-cccl`, CUDA 13) on PyPI; they go into a
# virtualenv under target/, made once and reused.
#
#   source deploy/cuda/env.sh && cargo build --release -p ps-worker --features cuda
#
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are compiled for
# (candle-kernels reads it; default 80 = A100, 90 = H100/H200, 89 = L4/RTX 40xx).
# Without a GPU on the build machine it must be set, since nothing can be queried.
_ps_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_ps_venv="${PS_CUDA_VENV:-$_ps_root/target/cuda-venv}"
# Pinned to one release so every build compiles the kernels with the same compiler.
_ps_cuda_version="${PS_CUDA_VERSION:-13.0.*}"
if [ ! -x "$_ps_venv/bin/python" ]; then
  python3 -m venv "$_ps_venv"
fi
# nvcc's wheel depends on nvvm (cicc) and crt unpinned, and pip would take their
# newest release, whose PTX this ptxas cannot assemble: every part is pinned.
_ps_parts="nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl"
_ps_stamp="$_ps_venv/.installed-cuda-${_ps_cuda_version//\*/x}"
if [ ! -f "$_ps_stamp" ]; then
  echo "[cuda] installing CUDA $_ps_cuda_version's nvcc, nvvm, headers and CCCL from PyPI into $_ps_venv" >&2
  # shellcheck disable=SC2086
  "$_ps_venv/bin/pip" install -q --disable-pip-version-check \
    $(for part in $_ps_parts; do printf '%s==%s ' "$part" "$_ps_cuda_version"; done) >&2 \
    && touch "$_ps_stamp"
fi
if [ ! -f "$_ps_stamp" ]; then
  echo "[cuda] could not install the CUDA compiler from PyPI" >&2
  unset _ps_root _ps_venv _ps_cuda_version _ps_parts _ps_stamp
  return 1
fi
CUDA_ROOT="$(echo "$_ps_venv"/lib/python3*/site-packages)/nvidia/cu13"
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# candle-kernels runs its nvcc jobs on half the cores unless told otherwise.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
echo "[cuda] $(nvcc --version | tail -n 2 | head -n 1); kernels for compute capability $CUDA_COMPUTE_CAP" >&2
unset _ps_root _ps_venv _ps_cuda_version _ps_parts _ps_stamp
