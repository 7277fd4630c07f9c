# The GPU workers' image: `worker` built with the `cuda` feature (candle on
# GPU 0) and `ctl`, on NVIDIA's CUDA runtime image. Shards stay on the CPU
# image (deploy/Dockerfile); the Kubernetes GPU overlay uses this one.
#
#   docker build -f deploy/gpu.Dockerfile -t paramserver-worker-cuda:latest .
#   docker build -f deploy/gpu.Dockerfile --build-arg CUDA_COMPUTE_CAP=80 ...   # A100
#
# It needs a registry (NVIDIA's base images, rustup, crates.io). Running it
# needs an NVIDIA driver of CUDA 13.0 or newer on the host and the NVIDIA
# container toolkit (`docker run --gpus all`; on Kubernetes, NVIDIA's device
# plugin). candle compiles its kernels for one GPU generation, chosen here.
ARG CUDA_VERSION=13.0.0

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
# 90: H100/H200; 89: L4/RTX 40xx; 80: A100; 86: A10/RTX 30xx.
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:/usr/local/cuda/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
# The devel image's lib64/stubs/libcuda.so satisfies the link; the driver's
# libcuda.so.1 is mounted at run time by the container toolkit.
RUN cargo build --release --locked -p ps-worker --features cuda --bin worker \
    && cargo build --release --locked -p ps-ctl --bin ctl

# The runtime image carries cuBLAS, cuRAND and NVRTC, which the worker links.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN groupadd --gid 10001 ps && useradd --uid 10001 --gid ps --no-create-home --shell /usr/sbin/nologin ps \
    && mkdir -p /var/lib/paramserver && chown 10001:10001 /var/lib/paramserver
COPY --from=build /src/target/release/worker /src/target/release/ctl /usr/local/bin/
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 9101
CMD ["worker", "train"]
