# pacs-xai GPU image: CUDA runtime, ONNX Runtime with the CUDA provider, torch with CUDA, non-root.
#
# Build (from the repository root):   docker build -t pacs-xai .
# Run:   docker run --gpus all -p 11112:11112 -p 9110:9110 \
#            -v pacs-xai-data:/var/lib/pacs-xai \
#            -v "$PWD/node.yaml:/etc/pacs-xai/node.yaml:ro" pacs-xai
#
# Without a mounted config the image runs deploy/docker/node.yaml (listens on 0.0.0.0:11112,
# metrics on 0.0.0.0:9110, any caller, no destination: results wait in the outbox). Without a GPU
# it runs too: ONNX Runtime and torch fall back to the CPU. docs/operations.md has the details.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Stage 1: the wheel, exactly what `pip install pacs-xai` users get (the demo model inside it).
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY dicom_io ./dicom_io
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Stage 2: the runtime, with the wheel installed (no source tree in the image).
FROM base

LABEL org.opencontainers.image.title="pacs-xai" \
      org.opencontainers.image.description="DICOM node: classifier + explainers, results back to PACS as DICOM; Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=wheel /dist /dist

# pacs-xai depends on the CPU package `onnxruntime`; the GPU build `onnxruntime-gpu` provides the
# same module, so the CPU one is removed after the install (never keep both). The triton extra
# (tritonclient) lets the workers use a Triton server (model.triton_url).
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir torch==2.13.0 "$(ls /dist/pacs_xai-*.whl)[gpu,queue,triton]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir --force-reinstall --no-deps 'onnxruntime-gpu>=1.18' \
 && rm -rf /dist \
 && python -c "import onnxruntime; from service.models import demo_card_path; print(onnxruntime.get_available_providers(), demo_card_path())"

# A fixed uid/gid (10001) so Kubernetes' runAsUser/fsGroup and volume permissions can name it.
RUN groupadd --system --gid 10001 pacs-xai \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/pacs-xai --create-home pacs-xai \
 && install -d -o 10001 -g 10001 /var/lib/pacs-xai/spool
# (spool/ exists in the image so that a shared spool volume mounted there is the user's: the queue)

# The default config; mount your own over it (a file mount or a Kubernetes ConfigMap at /etc/pacs-xai).
COPY deploy/docker/node.yaml /etc/pacs-xai/node.yaml

USER 10001:10001
WORKDIR /var/lib/pacs-xai

# DICOM (C-STORE in) and HTTP (/metrics, /healthz, /readyz); both set in node.yaml.
EXPOSE 11112 9110

# Spool, quarantine, outbox and the SQLite journal (storage.data_dir): keep it on a volume, one
# per node; a restart resumes from it.
VOLUME ["/var/lib/pacs-xai"]

# Liveness of the HTTP endpoint on the metrics port (no curl in the image: Python's urllib).
# PACS_XAI_METRICS__PORT, when set, overrides metrics.port in the node and here alike.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PACS_XAI_METRICS__PORT', '9110') + '/healthz', timeout=4)"]

ENTRYPOINT ["pacs-xai"]
CMD ["serve", "--config", "/etc/pacs-xai/node.yaml"]
