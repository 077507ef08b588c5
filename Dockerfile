# The map service: BentoML + onnxruntime, no torch. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg RUNTIME=gpu -t tsimcne-map:gpu .
# and run with `docker run --gpus all ...` (CUDA 13 + cuDNN 9 come from pip wheels; the host needs only
# the NVIDIA driver and container toolkit). The bundle is mounted at /models:
#   docker run -p 3000:3000 -v "$PWD/models/demo:/models:ro" tsimcne-map
# or baked in: docker build --build-arg BUNDLE=demo -t tsimcne-map:demo .   (copies models/demo)
# The service writes only under /tmp (BENTOML_HOME: BentoML's Prometheus files), so it runs with a read-only
# root filesystem and a writable /tmp (`docker run --read-only --tmpfs /tmp ...`; Kubernetes: an emptyDir).
# Built and run for real by scripts/container-check (podman); PYTHON_IMAGE may name any Debian-based image
# with python3 and pip (the check makes one offline with debootstrap when no registry is reachable).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: the base image is the PYTHON_IMAGE argument, a pinned tag by default

FROM ${PYTHON_IMAGE} AS bundle
ARG BUNDLE=""
COPY models/ /src-models/
RUN mkdir -p /out \
    && if [ -n "${BUNDLE}" ]; then cp -r "/src-models/${BUNDLE}/." /out/; fi

FROM ${PYTHON_IMAGE}
ARG RUNTIME=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    OPENBLAS_NUM_THREADS=1 \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_HOST=0.0.0.0 \
    BENTOML_PORT=3000 \
    TSIMCNE_BUNDLE=/models \
    TSIMCNE_PROVIDER=auto
WORKDIR /app
# Pinned dependencies first (a layer that changes only with them), then the project without deps.
# No torch: the core and `serve` extra do not need it. onnxruntime and onnxruntime-gpu share one package
# folder, so the GPU image swaps one for the other instead of installing both; likewise faiss-cpu and
# faiss-gpu-cu12 (FAISS GPU kernels built for compute capability 7.0-8.9, CUDA 12 from pip; where they do not
# run, e.g. possibly on Hopper, the service keeps the feature index on the CPU and /info says why). Not yet
# run on a GPU here.
COPY deploy/requirements-serve.txt deploy/requirements-gpu.txt /tmp/requirements/
RUN pip install --no-cache-dir --requirement /tmp/requirements/requirements-serve.txt \
    && if [ "${RUNTIME}" = "gpu" ]; then \
         pip uninstall --yes onnxruntime faiss-cpu \
         && pip install --no-cache-dir --requirement /tmp/requirements/requirements-gpu.txt; \
       fi \
    && rm -rf /tmp/requirements \
    && useradd --create-home --uid 10001 tsimcne
COPY pyproject.toml README.md ./
COPY tsimcne_core/ tsimcne_core/
COPY serving/ serving/
COPY training/ training/
COPY tsimcne_map/ tsimcne_map/
COPY tsimcne_cli/ tsimcne_cli/
# /journal: where deploy/compose.yaml and the Kubernetes journal-sqlite component keep the SQLite journal
# (TSIMCNE_JOURNAL=sqlite:////journal/journal.db on a volume); owned by the service's user, so that a new
# Docker named volume mounted there is writable by it. Without a volume it stays on the read-only root.
RUN pip install --no-cache-dir --no-deps . \
    && install -d -o 10001 -g 10001 -m 0750 /journal
COPY --from=bundle --chown=10001:10001 /out /models
USER 10001
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:' + os.environ.get('BENTOML_PORT', '3000') + '/readyz'; sys.exit(urllib.request.urlopen(url, timeout=4).status != 200)"]
# Host and port from BENTOML_HOST / BENTOML_PORT (bentoml serve reads them), so the health check follows.
CMD ["bentoml", "serve", "serving.service:MapService"]
