# rwkvd: gRPC on :50051 and HTTP on :8000, one process per GPU.
#   docker build -t rwkvd .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v /models:/models:ro -v rwkvd-data:/data \
#     rwkvd --model /models/rwkv7-g1-2.9b.pth
# With no --model it serves the built-in demo model (random weights). Every flag also reads an RWKVD_*
# variable (docker run -e RWKVD_MODEL=...). Kubernetes manifests and an Envoy config are in deploy/.
#
# Base: NVIDIA's CUDA *base* image, not -runtime. It carries cudart and the NVIDIA container toolkit's
# contract (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, and NVIDIA_REQUIRE_CUDA, so the toolkit
# refuses a host driver too old for CUDA 13 with a clear error at start instead of a torch failure
# later). torch's CUDA wheel brings its own cuBLAS, cuDNN and NCCL as pip packages, so -runtime's copies
# (~2 GB) would never be loaded. torch 2.13.0 on PyPI is built for CUDA 13, hence a 13.0 base image.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# Another torch build for another CUDA: --build-arg TORCH_VERSION=... (and a matching base image).
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/rwkvd \
    PATH=/opt/rwkvd/bin:$PATH

# python3-dev and gcc: Triton compiles its kernel launcher against Python.h with the system C compiler
# the first time a kernel runs. tini: PID 1 that forwards SIGTERM to rwkvd (whose drain handles it) and
# lets a second signal kill it, which a bare PID 1 would ignore.
# Versions are not pinned: Ubuntu's archive drops superseded versions (security updates), so exact pins
# would break rebuilds; the base image tag fixes the release and with it these packages' series.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev python3 python3-dev python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first and alone: a layer that changes only with TORCH_VERSION (its CUDA wheels are most of the image).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /app
COPY deploy/docker/constraints.txt deploy/docker/healthcheck.py ./
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY clients/ clients/
COPY kernels/ kernels/
COPY service/ service/
# The client package generates its gRPC stubs from proto/ while it builds (its build hook).
RUN pip install --no-cache-dir -c constraints.txt ./clients . \
    && useradd --system --user-group --uid 10001 --home-dir /data --create-home rwkvd

# /data: the task and prediction store and saved states (--data-dir), plus Triton's kernel cache, so
# compiled kernels survive restarts. Owned by rwkvd before VOLUME, so a fresh named volume inherits that.
ENV RWKVD_DATA_DIR=/data \
    RWKVD_HOST=0.0.0.0 \
    RWKVD_GRPC_PORT=50051 \
    RWKVD_HTTP_PORT=8000 \
    RWKVD_LOG_FORMAT=json \
    HOME=/data \
    TRITON_CACHE_DIR=/data/.cache/triton
VOLUME ["/data"]

# Numeric, so Kubernetes' runAsNonRoot can check it (a user name cannot be verified against the image).
USER 10001:10001
EXPOSE 50051 8000
# rwkvd drains on SIGTERM: not ready at once, calls accepted for --drain-seconds, then --grace-seconds for
# those in flight. Give `docker stop -t` (or terminationGracePeriodSeconds) more than the two together.
STOPSIGNAL SIGTERM
# start-period covers loading a large checkpoint; failures inside it do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["tini", "--", "rwkvd", "serve"]
