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
APT_PACKAGES=(libb64-0d docker-compose chromium)
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

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[triton,client,proxy,export,bench,dev]"
# The server binary needs none of PyTriton's Python dependencies (its numpy<2 pin among them).
"$VENV/bin/python" -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
# libcudart.so.12 for perf_analyzer; no GPU is used.
"$VENV/bin/python" -m pip install -q --no-deps "nvidia-cuda-runtime-cu12==12.6.77"
echo "setup: $VENV ready"
