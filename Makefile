# Two commands matter: `make run` (set up and serve) and `make test` (set up and test).
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done

.PHONY: setup run export triton perf bench bench-quick reliability soak test test-fast screenshot k8s-play lint format clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

# Set up, export if needed, and serve: Triton, then the proxy on $$PROXY_PORT (8080).
run: setup
	$(PY) -m serving

# Export the ONNX models for $$MOBILESAM_CHECKPOINT (default: the official weights).
export: setup
	$(PY) -m export

# Serve the model repository with the real tritonserver (exports first if needed).
triton: setup
	$(PY) -m serving --triton-only

# perf_analyzer tables for both models against a Triton it starts itself.
perf: setup
	$(PY) -m benchmarks.perf_analyzer

# Benchmarks (about 30 min on 2 quiet cores; bench-quick about 10) -> build/bench/, BENCHMARKS.md.
bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

# Abuse and faults (about 25 min): huge uploads, segment everything at its largest batches,
# load at 3x capacity with kill -9 of Triton -> build/reliability/ (figures in RELIABILITY.md).
reliability: setup
	$(PY) -m benchmarks.reliability uploads allocator everything fault

# 30 minutes of mixed traffic, the memory of the proxy and of Triton sampled throughout.
soak: setup
	$(PY) -m benchmarks.reliability soak

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest

# The tests that need neither Triton, a proxy process nor upstream on photographs (under a minute).
test-fast: setup
	$(PY) -m pytest -m "not integration" -n auto

# docker-compose.yml built and run for real, with podman (no Docker engine or registry here):
# podman and docker-compose from apt, a Debian 12 base, the three images (tagged `test`, so a
# user's own images stay), then tests/containers. Not part of `make test`; README, "Docker".
CONTAINER_TAG := test
.PHONY: test-containers
test-containers: setup
	bash scripts/podman.sh setup
	IMAGE_TAG=$(CONTAINER_TAG) PY=$(PY) bash scripts/podman.sh build
	IMAGE_TAG=$(CONTAINER_TAG) $(PY) -m pytest tests/containers

# The README's picture of the web page: the real stack (test checkpoint) in a real browser.
screenshot: setup
	WEB_PAGE_SCREENSHOT=$(CURDIR)/docs/web-page.png $(PY) -m pytest -q tests/test_web_page.py -k readme_screenshot

# The small Kubernetes overlay's Triton and proxy pods under `podman kube play`, answering one
# request (needs the images of `scripts/podman.sh build`; not part of `make test`).
k8s-play: setup
	CONTAINERS_CONF=$(CURDIR)/build/podman/containers.conf PYTHONPATH=. $(PY) scripts/k8s_podman_play.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build model_repository/*/[0-9]*/model.onnx model_repository/*/[0-9]*/export.json
