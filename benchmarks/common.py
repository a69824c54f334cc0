"""Paths, JSON results and machine facts every section shares.

Results are plain JSON files, one per section, so that the report can be regenerated (and
tested) without running anything, and a section can be re-run on its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from common.settings import PROJECT_ROOT

log = logging.getLogger("bench")

BENCH_DIR = PROJECT_ROOT / "build" / "bench"
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = BENCH_DIR / "logs"
PLOTS_DIR = PROJECT_ROOT / "benchmarks" / "plots"
REPORT_PATH = PROJECT_ROOT / "BENCHMARKS.md"

# What one run measures, in order; each writes build/bench/results/<section>.json.
SECTIONS = ("peak", "delay", "batching", "runtime", "graph", "int8", "e2e")

# Both our stack and the PyTorch baseline get the same fixed thread budget: the machine's two
# cores. Fixed, so that runs on a bigger machine stay comparable with the committed report.
THREADS = 2


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.partial")
    staging.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    staging.replace(path)  # a half-written result never replaces a good one
    return path


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load: how busy the machine was with other work around a run."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers came from: the report prints it next to every headline figure."""
    cpu = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "isa": [flag for flag in wanted if flag in flags],
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def package_versions() -> dict[str, str]:
    names = ["onnxruntime", "openvino", "torch", "tritonclient", "nvidia-pytriton", "numpy"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
