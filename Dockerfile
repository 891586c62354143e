# pacs-xai GPU image: CUDA runtime, ONNX Runtime with the CUDA provider, torch with CUDA, non-root.
# Build: docker build -t pacs-xai .     Run: docker run --gpus all -p 11112:11112 pacs-xai
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pacs-xai
COPY pyproject.toml README.md ./
COPY service ./service
COPY dicom_io ./dicom_io
COPY deploy ./deploy

# pacs-xai depends on the CPU package `onnxruntime`; the GPU build `onnxruntime-gpu` provides the
# same module, so the CPU one is removed after the install (never keep both).
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir torch==2.13.0 -e '.[gpu]' \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir --force-reinstall --no-deps 'onnxruntime-gpu>=1.18' \
 && python -c "import onnxruntime, service.cli; print(onnxruntime.get_available_providers())"

RUN useradd --system --uid 10001 --home-dir /var/lib/pacs-xai --create-home pacs-xai
USER pacs-xai
WORKDIR /var/lib/pacs-xai

# Output of `explain`/the node lands here; mount a volume.
VOLUME ["/var/lib/pacs-xai"]
ENTRYPOINT ["pacs-xai"]
CMD ["--help"]
