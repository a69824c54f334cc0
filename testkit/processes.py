"""HTTP servers in processes of their own (the proxy, the PyTorch baseline), always stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.settings import PROJECT_ROOT, Settings
from serving.processes import stop_process
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
