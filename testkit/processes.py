"""HTTP servers in processes of their own (the proxy, the PyTorch baseline), always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.settings import PROJECT_ROOT, Settings
from serving.processes import (
    kill_process_group,
    proc_stat,
    process_group_members,
    stop_process,
)
from testkit.ports import free_port


@dataclass
class ServerProcess:
    """A Python HTTP server started with `command`, up once `health_path` answers 200."""

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
                tail = self.log_path.read_text(errors="replace")[-3000:]
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
        if self.process is not None:
            stop_process(self.process, timeout_s)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def proxy_process(
    settings: Settings,
    log_path: Path,
    extra_env: Mapping[str, str] | None = None,
    health_path: str = "/healthz",
) -> ServerProcess:
    """`python -m proxy` exactly as `make run` starts it, pointed at the settings' Triton.

    `health_path="/readyz"` waits until Triton and both models are ready too.
    """
    port = free_port()
    env = {
        "PROXY_HOST": "127.0.0.1",
        "PROXY_PORT": str(port),
        "TRITON_HOST": settings.triton_host,
        "TRITON_HTTP_PORT": str(settings.triton_http_port),
        "MODEL_REPOSITORY": str(settings.model_repository),
        "PRECISION": settings.precision,
        **(extra_env or {}),
    }
    return ServerProcess(
        name="proxy",
        command=[sys.executable, "-m", "proxy"],
        port=port,
        log_path=log_path,
        env=env,
        health_path=health_path,
    )


TRITON_PORTS = ("HTTP", "GRPC", "METRICS")


class LaunchedStack:
    """`python -m serving` (what `make run` runs) on free ports: Triton and the proxy,
    supervised by the launcher. `start()` returns once the proxy's /readyz answers 200."""

    def __init__(
        self, model_repository: Path, log_path: Path, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.ports = {name: free_port() for name in (*TRITON_PORTS, "PROXY")}
        self.env = {
            **os.environ,
            "MODEL_REPOSITORY": str(model_repository),
            "PROXY_PORT": str(self.ports["PROXY"]),
            **{
                f"TRITON_{port}_PORT": str(self.ports[port]) for port in ("HTTP", "GRPC", "METRICS")
            },
            **(extra_env or {}),
        }
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{self.ports['PROXY']}"
        self.runner: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.runner = subprocess.Popen(
            [sys.executable, "-m", "serving"],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.wait_until_ready(timeout_s)

    def wait_until_ready(self, timeout_s: float = 180) -> float:
        """Seconds until the proxy's /readyz answered 200."""
        started = time.monotonic()
        while True:
            if self.runner.poll() is not None:
                raise RuntimeError(f"the launcher exited: {self.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"never ready: {self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def triton_pid(self) -> int:
        """tritonserver's pid, found by its HTTP port."""
        flag = f"--http-port={self.ports['HTTP']}".encode()
        for pid in pids():
            if flag in cmdline(pid).split(b"\0"):
                return pid
        raise RuntimeError("no tritonserver with our port")

    def proxy_pid(self) -> int:
        (pid,) = [pid for pid in self.children() if b"proxy" in cmdline(pid).split(b"\0")]
        return pid

    def children(self) -> list[int]:
        return [
            pid
            for pid in pids()
            if (fields := proc_stat(pid)) and int(fields[1]) == self.runner.pid
        ]

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM, as a user stops `make run`; returns the launcher's exit code."""
        return stop_process(self.runner, timeout_s)

    def kill(self) -> None:
        """After a failure: the launcher, its children and its Triton's group."""
        if self.runner is None or self.runner.poll() is not None:
            return
        with contextlib.suppress(RuntimeError, ProcessLookupError):
            kill_process_group(self.triton_pid())
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.runner.kill()
        self.runner.wait()

    def __enter__(self) -> LaunchedStack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()


def pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").glob("[0-9]*")]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (VmRSS), or its peak (VmHWM); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def reset_peak_rss(pid: int) -> None:
    """Start the process's peak (VmHWM) afresh from its current resident memory (Linux's
    `clear_refs` 5), so the next peak belongs to what runs next."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def stub_pid(triton_pid: int, model: str) -> int:
    """The Python-backend stub serving `model` for the tritonserver `triton_pid`."""
    for pid in process_group_members(triton_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"triton_python_backend_stub" in command[0] and any(
            f"/{model}/".encode() in argument for argument in command
        ):
            return pid
    raise LookupError(f"no Python-backend stub found for {model}")


def stub_peak_rss_mb(triton_pid: int, model: str) -> float:
    """Peak resident memory (VmHWM) of the Python-backend stub serving `model`."""
    return rss_mb(stub_pid(triton_pid, model), "VmHWM")
