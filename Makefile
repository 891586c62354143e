# pacs-xai: `make demo` runs the main job on the built-in demo model, `make test` runs the tests.
# Both work from nothing: they create .venv, install what they need, then run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Triton's Python server (nvidia-pytriton, with a bundled CPU-capable tritonserver) needs NumPy < 2,
# so it lives in a virtualenv of its own; the node talks to it over gRPC (tritonclient, main venv).
# Its Python is the system's where there is one: the server's Python backend stub links the
# system libpython3.X, and the virtualenv's standard library must be that same release's
# (pyenv's 3.11.7 stdlib under Debian's 3.11.2 libpython fails in multiprocessing).
TRITON_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) $(PYTHON))
TRITON_VENV  := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-stamp
PYTRITON     := nvidia-pytriton==0.7.0 'numpy>=1.26,<2' pyyaml==6.0.3
# The CPU wheel of torch is installed first and pinned, so pip never pulls a CUDA build.
TORCH  := torch==2.13.0
SYSTEM_TOOLS := dciodvfy dcmdump dcmj2pnm storescu storescp echoscu Orthanc promtool redis-server
SYSTEM_PACKAGES := dcmtk dicom3tools orthanc prometheus redis-server

.PHONY: triton-venv demo test test-fast test-integration test-torture reliability lint train-demo train-saliency system-deps clean help viewer test-viewer viewer-deps

help:
	@echo "make demo        explain phantom and real sample studies into demo-out/"
	@echo "make test        run the test suite (installs DCMTK and dicom3tools when missing)"
	@echo "make test-fast   the unit tier without slow tests, two workers (about 70 s)"
	@echo "make test-integration the integration tier: DCMTK and Orthanc peers, the node, benches, the wheel"
	@echo "make test-torture the torture tier: garbage on the wire and in files, exhaustion, crashes, security"
	@echo "make reliability the torture tier, writing docs/reliability.md from what it found"
	@echo "make lint        ruff check and ruff format --check"
	@echo "make train-demo  retrain the shipped demo model, its saliency masker, OOD statistics and healthy-appearance VAE"
	@echo "make train-saliency retrain the real-time saliency masker beside it (under a minute)"
	@echo "make viewer      see the results in OHIF on Orthanc, on 127.0.0.1 (until Ctrl-C)"
	@echo "make triton-venv .venv-triton: the Triton server (nvidia-pytriton, NumPy < 2) for the GPU tier and its tests"
	@echo "make test-viewer open pacs-xai's results in OHIF in headless Chromium (browser test)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[test,demo,export,models,queue]'
	# TorchXRayVision (model init --torchxrayvision) without its dependency list, which would pull a
	# torchvision build for another torch; what it imports is in the models and test extras.
	$(BIN)/python -m pip install --quiet --no-deps torchxrayvision==1.3.5
	# Quantus (the reference for the evaluation metrics) without its dependency list: it asks for
	# opencv-python beside the headless build scikit-image brings; what it imports is in the test extra.
	$(BIN)/python -m pip install --quiet --no-deps quantus==0.6.0
	touch $(STAMP)

# The Triton server's own virtualenv (the tests start it on a loopback port; see service/tools/triton/).
$(TRITON_STAMP): Makefile
	test -x $(TRITON_VENV)/bin/python || $(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(TRITON_VENV)/bin/python -m pip install --quiet $(TORCH) $(PYTRITON)
	touch $(TRITON_STAMP)

triton-venv: $(TRITON_STAMP)

demo: $(STAMP)
	$(BIN)/pacs-xai demo run --out demo-out

# Tiers (see pyproject.toml): tests/unit, tests/integration, tests/viewer (make test-viewer).
test: $(STAMP) $(TRITON_STAMP) system-deps
	$(BIN)/python -m pytest -q

# Two workers (pytest-xdist), one torch thread each: about 70 s on 2 cores instead of 2 minutes.
test-fast: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow" tests/unit

test-integration: $(STAMP) $(TRITON_STAMP) system-deps
	$(BIN)/python -m pytest -q tests/integration

# The torture tier (also part of make test): about 9 minutes on 2 cores. PACSXAI_TORTURE_LONG=1
# runs it with the long budgets (200,000 wire cases, 20,000 files, a 5,000-instance soak).
test-torture: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/torture

reliability: $(STAMP) system-deps
	OMP_NUM_THREADS=1 PACSXAI_RELIABILITY_REPORT=docs/reliability.md $(BIN)/python -m pytest -q tests/torture

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Retraining writes a new card: the masker and the OOD statistics, fitted to the old weights, are
# made again for the new ones (train-saliency, then calibrate).
train-demo: $(STAMP)
	$(BIN)/pacs-xai demo train --out service/models/demo
	$(BIN)/pacs-xai demo train-saliency --out service/models/demo
	$(BIN)/pacs-xai model calibrate service/models/demo --phantoms 900
	$(BIN)/pacs-xai demo train-healthy --out service/models/demo --figure docs/healthy-appearance-held-out.png

# The masker is trained against the demo model: retrain it after train-demo.
train-saliency: $(STAMP)
	$(BIN)/pacs-xai demo train-saliency --out service/models/demo

# The tests run the real DCMTK tools, dciodvfy and Orthanc; install them when they are missing.
# (Orthanc's package may fail to start its system service in a container; the binary is what counts.)
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(SYSTEM_PACKAGES) (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || { \
	    echo "$$tool is still missing: install $(SYSTEM_PACKAGES) with your package manager, then run make test again"; exit 1; }; done; \
	fi

# The viewer stack: Orthanc with DICOMweb, nginx, Chromium (browser test), npm (fetches OHIF once).
VIEWER_PACKAGES := orthanc orthanc-dicomweb nginx chromium
viewer-deps:
	@if [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || ! command -v nginx >/dev/null || \
	   ! command -v chromium >/dev/null || ! command -v npm >/dev/null; then \
	  echo "installing $(VIEWER_PACKAGES)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(VIEWER_PACKAGES) >/dev/null || true; \
	  command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq npm >/dev/null || true; \
	fi

viewer: $(STAMP) viewer-deps
	$(BIN)/pacs-xai viewer

test-viewer: $(STAMP) system-deps viewer-deps
	$(BIN)/python -m pytest -q -m viewer tests/viewer

clean:
	rm -rf demo-out test-artifacts .pytest_cache
