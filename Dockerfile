# rwkvd: gRPC :50051 and HTTP :8000. Build: docker build -t rwkvd .
# Run:   docker run --gpus all -p 50051:50051 -p 8000:8000 -v /models:/models rwkvd --model /models/x.pth
# (No --model: the built-in demo model.) The torch wheel brings its own CUDA runtime; the host's
# NVIDIA driver is mounted by the NVIDIA container toolkit.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RWKVD_DATA_DIR=/data

WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY proto/ proto/
COPY clients/ clients/
COPY pyproject.toml README.md ./
COPY service/ service/
COPY kernels/ kernels/
RUN pip install ./clients . \
    && useradd --system --uid 10001 --home-dir /data --create-home rwkvd

USER rwkvd
EXPOSE 50051 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["rwkvd", "serve"]
