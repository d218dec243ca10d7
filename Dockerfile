# The zspace serving image: the service, ONNX Runtime, FAISS and gRPC; no torch, no compilers.
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY zspace /src/zspace
COPY service /src/service
COPY index /src/index
COPY training /src/training
# The serving extra only: ONNX Runtime, grpcio, FAISS, numpy, Pillow. Torch stays out.
# serve-cpu: plain onnxruntime (default); serve: onnxruntime-gpu (docker-compose.gpu.yml).
ARG SERVE_EXTRA=serve-cpu
RUN python3 -m venv /opt/zspace \
 && /opt/zspace/bin/pip install --no-compile "/src[${SERVE_EXTRA}]" \
 && rm -rf /src \
 && find /opt/zspace -name "__pycache__" -prune -exec rm -rf {} + \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin zspace \
 && mkdir -p /models /indexes && chown zspace /indexes

USER zspace
ENV PATH=/opt/zspace/bin:$PATH \
    ZSPACE_SERVE_MODELS=/models ZSPACE_SERVE_INDEXES=/indexes ZSPACE_SERVE_HOST=0.0.0.0 \
    ZSPACE_SERVE_PORT=50051 ZSPACE_SERVE_METRICS_PORT=9100 ZSPACE_WORKERS=1 ZSPACE_HTTP_PORT=8000
# 50051 gRPC (zspace.v1, KServe v2), 8000 HTTP (KServe v2 REST, JSON, the explorer at /ui/), 9100 metrics.
EXPOSE 50051 8000 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "zspace.service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["zspace", "serve"]
