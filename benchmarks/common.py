"""Paths, JSON results, free ports and the server subprocesses every section shares.

Results are plain JSON files, one per section, so that the report can be regenerated (and
tested) without running anything, and a section can be re-run on its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from serving.settings import PROJECT_ROOT
from serving.triton import free_port

log = logging.getLogger("bench")

BENCH_DIR = PROJECT_ROOT / "build" / "bench"
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = BENCH_DIR / "logs"
PLOTS_DIR = PROJECT_ROOT / "benchmarks" / "plots"
REPORT_PATH = PROJECT_ROOT / "BENCHMARKS.md"

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


@dataclass
class ServerProcess:
    """A Python HTTP server in its own process (the proxy or the baseline), always stopped."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/healthz"
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **self.env},
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer {self.health_path} in time")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def proxy_process(triton_http_port: int, model_repository: Path, log_name: str) -> ServerProcess:
    """`python -m proxy` exactly as `make run` starts it, pointed at one Triton."""
    port = free_port()
    return ServerProcess(
        name="proxy",
        command=[sys.executable, "-m", "proxy"],
        port=port,
        log_path=LOG_DIR / f"{log_name}.log",
        env={
            "PROXY_HOST": "127.0.0.1",
            "PROXY_PORT": str(port),
            "TRITON_HOST": "127.0.0.1",
            "TRITON_HTTP_PORT": str(triton_http_port),
            "MODEL_REPOSITORY": str(model_repository),
        },
        health_path="/readyz",  # 200 once Triton and both models are ready
    )
