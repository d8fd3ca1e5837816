# protoserve on a CUDA machine: kernels built with CUDA, onnxruntime-gpu and
# faiss-gpu for the backbones and the support index. Not built in CI (no
# Docker engine there); CI compiles the same CUDA sources with nvcc instead.
ARG CUDA_VERSION=12.6.3
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv g++ cmake ninja-build git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && PROTOSERVE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" \
       /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip install --no-cache-dir onnxruntime-gpu faiss-gpu-cu12

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 50051 9090
ENTRYPOINT ["protoserve"]
CMD ["info"]
