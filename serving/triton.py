"""Run the real `tritonserver` from the nvidia-pytriton wheel, without Docker.

The wheel ships Triton 2.51.0 with the Python backend. Three things make it run outside its own
launcher (README, "Running Triton without Docker"): `LD_LIBRARY_PATH` must include the wheel's
bundled libraries, the 3.11 backend stub must sit in a backend directory next to
`libtriton_python.so`, and the stub finds numpy/onnxruntime through the first `python3` on
`PATH`, so this interpreter's `bin/` goes first.

`make run` and `make triton` (`python -m serving`) start it through `TritonServer`; so do the
tests and the benchmarks.
"""

from __future__ import annotations

import filecmp
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from common.settings import PROJECT_ROOT, Settings, get_settings
from serving.processes import die_with_parent, kill_process_group, stop_process

log = logging.getLogger("triton")

PYTHON_STUB_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# Per-instance shared memory between Triton and the Python stub: sized for a decoder response
# (1 MB per prompt) so that ordinary requests never wait for the region to grow.
PYTHON_BACKEND_SHM_BYTES = 64 * 1024 * 1024
# How long Triton waits for open connections and in-flight requests when asked to stop.
EXIT_TIMEOUT_S = 10


class TritonError(RuntimeError):
    """Triton could not be found, started, or made ready."""


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonError("nvidia-pytriton is not installed: run `make setup`")
    return Path(spec.origin).parent / "tritonserver"


def prepare_backend_directory(work_dir: Path) -> Path:
    """Lay out `<work_dir>/backends/python` with the library, its utils and the 3.11 stub."""
    root = pytriton_root()
    python_backend = work_dir / "backends" / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    stub = root / "python_backend_stubs" / PYTHON_STUB_VERSION / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"no Python backend stub for Python {PYTHON_STUB_VERSION} at {stub}")
    sources = [path for path in (root / "backends" / "python").iterdir() if path.is_file()]
    for source in [*sources, stub]:
        _install_file(source, python_backend / source.name)
    return work_dir / "backends"


def _install_file(source: Path, target: Path) -> None:
    """Copy unless already current; replace atomically, since a running server may hold it."""
    if target.is_file() and filecmp.cmp(source, target, shallow=True):
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(source, staging)
    staging.replace(target)


# glibc serves large allocations (a runtime call's activations, tens of MB) with fresh
# mmap'd pages and unmaps them when freed, so every call faults that memory in again, 4 KB at
# a time. With transparent huge pages for those chunks (the kernel's THP mode "madvise"; no
# effect under "always" or "never") the faults are 512x fewer and the memory still returns
# after each call. It made the decoder's calls 1.22x faster before the decoder kept ONNX
# Runtime's arena, which reuses its buffers; it still serves what is allocated afresh (a
# model without the arena, OpenVINO, the backend's numpy). BENCHMARKS.md, "Defaults chosen
# from the data", measures it against 4 KB pages.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def with_malloc_tunables(tunables: str) -> str:
    """GLIBC_TUNABLES with ours added, a user's own settings kept (theirs win)."""
    if "glibc.malloc.hugetlb=" in tunables:
        return tunables
    return ":".join(part for part in (MALLOC_TUNABLES, tunables) if part)


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = with_malloc_tunables(env.get("GLIBC_TUNABLES", ""))
    libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(libs), env.get("LD_LIBRARY_PATH", "")) if part
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


@dataclass
class TritonServer:
    """One `tritonserver` process on the given repository and ports."""

    model_repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    work_dir: Path = PROJECT_ROOT / "build" / "triton"
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)  # over this process's own
    process: subprocess.Popen | None = None
    watchdog: subprocess.Popen | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> TritonServer:
        settings = settings or get_settings()
        values = {
            "model_repository": settings.model_repository,
            "http_port": settings.triton_http_port,
            "grpc_port": settings.triton_grpc_port,
            "metrics_port": settings.triton_metrics_port,
            "host": settings.triton_host,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_directory: Path) -> list[str]:
        binary = pytriton_root() / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.model_repository.resolve()}",
            f"--backend-directory={backend_directory}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_BACKEND_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_BACKEND_SHM_BYTES}",
            *self.extra_args,
        ]

    def start(self) -> None:
        backend_directory = prepare_backend_directory(self.work_dir)
        command = self.command(backend_directory)
        log.info("starting %s", " ".join(command))
        output = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            env={**server_environment(), **self.environment},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop Triton ourselves, in order
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        # Whatever happens to this process, nothing of Triton's group outlives it.
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "serving.watchdog", str(self.process.pid), str(os.getpid())],
            cwd=PROJECT_ROOT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode}{self._log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "; last log lines:\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models and exits), then reap its whole group."""
        if self.process is None:
            return
        stop_process(self.process, timeout_s)
        # A Python-backend stub can outlive its server (seen after client timeouts); the
        # process group holds only what Triton started, so nothing of it may stay behind.
        kill_process_group(self.process.pid)
        if self.watchdog is not None:
            stop_process(self.watchdog, 5)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def export_if_needed(settings: Settings) -> None:
    """Run the (idempotent) export in its own process: only it needs torch."""
    subprocess.run(
        [sys.executable, "-m", "export", "--model-repository", str(settings.model_repository)],
        check=True,
    )
