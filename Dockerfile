# syntax=docker/dockerfile:1.6
#
# The nanomorph service (BentoML + onnxruntime), without torch and without training code.
#
#   GPU (default):  docker build -t nanomorph:gpu .
#                   docker run --gpus all -p 3000:3000 -v /srv/nanomorph/store:/models:ro nanomorph:gpu
#   CPU:            docker build --build-arg VARIANT=cpu -t nanomorph:cpu .
#   models baked in (an exported folder store inside the build context):
#                   docker build --build-arg MODELS=baked --build-arg MODELS_DIR=deploy/store -t nanomorph:gpu-baked .
#
# CUDA / cuDNN must match the onnxruntime-gpu wheel: onnxruntime-gpu 1.27 and later on PyPI
# (1.31.1 here) are built for CUDA 13.x + cuDNN 9 (their `cuda`/`cudnn` extras require
# nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0), hence the CUDA 13.0 image with cuDNN; it
# needs an NVIDIA driver >= 580 on the host. For older drivers use CUDA 12 with the last CUDA-12
# wheel: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#          --build-arg ORT_GPU=onnxruntime-gpu==1.26.0
# See docs/deployment.md.

ARG VARIANT=gpu
ARG MODELS=none
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- models: none (mounted) or baked
# Each stage holds /store; only the one MODELS names is built, so MODELS_DIR need not exist otherwise.
FROM scratch AS models-none
# (WORKDIR creates the folder: an empty store, filled by a volume at run time.)
WORKDIR /store

FROM scratch AS models-baked
# A folder store written by `nanomorph export` (DIR/<name>/<version>/ + DIR/<name>/latest),
# relative to the build context.
ARG MODELS_DIR=store
COPY ${MODELS_DIR}/ /store/

FROM models-${MODELS} AS models

# ------------------------------------------------------------------------------------- bases
FROM ${CUDA_IMAGE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

FROM ${PYTHON_IMAGE} AS base-cpu
RUN python -m venv /opt/venv

# ------------------------------------------------------------------------------------ service
FROM base-${VARIANT} AS service
ARG VARIANT
# onnxruntime-gpu REPLACES onnxruntime (both install into the same onnxruntime/ folder).
ARG ORT_GPU=onnxruntime-gpu==1.31.1
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what serving needs; .dockerignore keeps training/, tests/ and the rest out of the context.
COPY pyproject.toml README.m[d] ./
COPY nanomorph/ nanomorph/
COPY service/ service/
RUN pip install ".[serving]" \
    && if [ "$VARIANT" = "gpu" ]; then pip uninstall -y onnxruntime && pip install "$ORT_GPU"; fi \
    && python -c "import onnxruntime as ort, sys; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
    && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# Non-root: the service never needs to write outside its BentoML home.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin nanomorph \
    && mkdir -p /models \
    && chown nanomorph /models
COPY --from=models --chown=nanomorph /store/ /models/

# NANOMORPH_STORE=/models: baked-in models, or a volume mounted there (-v STORE:/models:ro).
# Everything else (tokens, providers, batching, limits) is set with -e at run time; see docs/service.md.
ENV NANOMORPH_STORE=/models \
    BENTOML_HOME=/home/nanomorph/bentoml \
    BENTOML_DO_NOT_TRACK=True
USER nanomorph
EXPOSE 3000

# Healthy once /readyz answers 200 (models loaded and warmed up). Python's urllib: no curl needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]

# `nanomorph serve` (PID 1) runs `bentoml serve service.service:Nanomorph` and, on `docker stop`'s
# SIGTERM, drains it within NANOMORPH_SHUTDOWN_GRACE_S (30 s): give `docker stop` / `docker run`
# a --stop-timeout (or Compose a stop_grace_period) above it, e.g. 45 s (docs/deployment.md).
STOPSIGNAL SIGTERM
CMD ["nanomorph", "serve", "--host", "0.0.0.0", "--port", "3000"]
