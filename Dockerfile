# syntax=docker/dockerfile:1
# PyptoServing images, one target per part (the console script `pypto-serving` runs each):
#
#   docker build --target operator -t pypto-serving-operator:0.1.0 .   # slim: no torch
#   docker build --target gateway  -t pypto-serving-gateway:0.1.0 .    # slim: no torch
#   docker build --target engine   -t pypto-serving:0.1.0 .            # CPU torch (tests, kind, demos)
#
# Ascend NPU engine: build FROM a CANN image and add torch-npu (torch must match it), e.g.
#   docker build --target engine -t pypto-serving:0.1.0-cann \
#     --build-arg ENGINE_BASE=ascendai/cann:8.0.0-910b-ubuntu22.04-py3.10 \
#     --build-arg TORCH_VERSION=2.5.1 --build-arg TORCH_NPU_VERSION=2.5.1 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The CANN base must set its environment (LD_LIBRARY_PATH, ASCEND_*) with ENV, as the ascendai/cann images do:
# the operator's pods run `pypto-serving engine` directly, no shell sources set_env.sh. The driver
# (/usr/local/Ascend/driver) and the devices come from the host through the Ascend device plugin.
#
# Versions: every Python package is pinned by constraints/image.txt (make image-constraints), torch by
# TORCH_VERSION, the base images by tag. tests/test_dockerfile.py checks the targets' entrypoints.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG ENGINE_BASE=python:3.11.7-slim-bookworm

# --- the pypto-serving wheel (pure Python) -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY pypto_serving/ pypto_serving/
COPY operator/ operator/
COPY engine/ engine/
COPY gateway/ gateway/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- operator and gateway: the base install (kopf, kubernetes, aiohttp, fastapi; no torch) -------------------
FROM ${PYTHON_IMAGE} AS slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints/image.txt,target=/tmp/image.txt \
    python -m pip install --constraint /tmp/image.txt /wheels/pypto_serving-*.whl \
    && groupadd --gid 65532 pypto && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin pypto
USER 65532:65532

FROM slim AS operator
EXPOSE 8081 9443
ENTRYPOINT ["pypto-serving", "operator"]
CMD ["--all-namespaces"]

FROM slim AS gateway
EXPOSE 8080
ENTRYPOINT ["pypto-serving", "gateway"]

# --- engine: torch + transformers (+ torch-npu on a CANN base) ----------------------------------------------
FROM ${ENGINE_BASE} AS engine
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_NPU_VERSION=""
# The engine's user. On Ascend hosts the device nodes and the driver belong to HwHiAiUser (often uid/gid
# 1000): set ENGINE_UID/ENGINE_GID to the host's, or run the pod as root where the device requires it.
ARG ENGINE_UID=1000
ARG ENGINE_GID=1000
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a C compiler: the cpu attention backend builds its kernel for the node's CPU on first use (-march=native, cached
# under ~/.cache/pypto-serving/kernels); without one it falls back to the torch_ref backend
RUN command -v cc >/dev/null || (apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*)
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints/image.txt,target=/tmp/image.txt \
    python3 -m pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && if [ -n "${TORCH_NPU_VERSION}" ]; then python3 -m pip install "torch-npu==${TORCH_NPU_VERSION}"; fi \
    && python3 -m pip install --constraint /tmp/image.txt "$(ls /wheels/pypto_serving-*.whl)[engine]" \
    && (getent group "${ENGINE_GID}" >/dev/null || groupadd --gid "${ENGINE_GID}" pypto) \
    && (getent passwd "${ENGINE_UID}" >/dev/null || useradd --uid "${ENGINE_UID}" --gid "${ENGINE_GID}" \
        --create-home --shell /usr/sbin/nologin pypto)
USER ${ENGINE_UID}:${ENGINE_GID}
EXPOSE 8000
ENTRYPOINT ["pypto-serving", "engine"]
CMD ["--help"]
