#!/usr/bin/env bash
# Install everything the project needs on a bare Debian machine with Python 3.11:
# the apt packages, a virtualenv with all extras, the Triton binary (nvidia-pytriton wheel)
# and perf_analyzer's CUDA runtime library. Idempotent; `make setup` runs it when
# pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# libb64-0d: perf_analyzer (tritonclient 2.51.0 wheel) links against it.
# docker-compose: the static compose checks in tests/test_docker_files.py (no engine here).
# chromium: the browser the web page's tests drive (playwright's own download is unreachable).
# redis-server: the shared embedding cache's tests run a real one.
APT_PACKAGES=(libb64-0d docker-compose chromium redis-server)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# kubectl (with its built-in kustomize) renders the Kubernetes manifests in the tests. This
# machine image ships it; Debian 12 has no package of it and no other source is reachable
# from here, so a machine without it stops now rather than halfway through the tests.
if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "setup: kubectl with kustomize (kubectl >= 1.14) is required for tests/test_kubernetes.py;" \
    "install it from the Kubernetes project's packages and re-run" >&2
  exit 1
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[triton,client,proxy,export,bench,dev]"
# The server binary needs none of PyTriton's Python dependencies (its numpy<2 pin among them).
"$VENV/bin/python" -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
# libcudart.so.12 for perf_analyzer; no GPU is used.
"$VENV/bin/python" -m pip install -q --no-deps "nvidia-cuda-runtime-cu12==12.6.77"
echo "setup: $VENV ready"
