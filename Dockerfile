# syntax=docker/dockerfile:1
# Two images from one build:
#   docker build --target operator -t ghcr.io/moe-eplb/operator:0.1.0 .
#   docker build --target worker --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       -t ghcr.io/moe-eplb/worker:0.1.0 .
# The chart runs the operator image with args only (its ENTRYPOINT is Kopf); the operator's
# StatefulSets run the worker image with the command `moe-eplb worker --config ...`.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# ---- build: one wheel of the project -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- operator: slim Python, no torch ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[operator]" && rm -rf /wheels \
    && useradd --uid 10002 --no-create-home --shell /usr/sbin/nologin moe-operator
USER 10002
ENTRYPOINT ["kopf", "run", "-m", "moe_operator.handlers"]

# ---- worker: CUDA base, torch, the worker extra --------------------------------------------
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_INDEX
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
COPY --from=build /wheels /wheels
RUN pip install --extra-index-url ${TORCH_INDEX} "$(ls /wheels/*.whl)[worker]" && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin moe-worker
# The placement kernels compiled ahead of time into the package (a C compiler and Python's
# headers only for this step): a starting pod places at once instead of compiling for seconds.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
    && python -m moe_worker.eplb.policy.aot \
    && apt-get purge -y gcc libc6-dev python3-dev && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*
USER 10001
EXPOSE 9400 9390 29500
ENTRYPOINT ["moe-eplb", "worker"]
CMD ["--config", "/etc/moe-eplb/config/worker.yaml"]
