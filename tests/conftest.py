"""Session fixtures: a seeded random-init checkpoint, its export, and a real Triton on free ports.

The official weights cannot be downloaded here, so the tests make a checkpoint of the official
architecture with a fixed seed and put it through the same export code as real weights. The
exported repository lives in build/ (git-ignored) and is reused while the checkpoint is the same.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from export.random_checkpoint import make_random_checkpoint
from serving.settings import PROJECT_ROOT, Settings
from serving.triton import TritonServer, free_port

BUILD = PROJECT_ROOT / "build" / "tests"
CHECKPOINT_SEED = 0


def copy_repository_layout(target: Path) -> Path:
    """The committed configs and model.py files (symlinks kept), leaving exported models be.

    Re-copied on every run so that config edits are picked up by the next session.
    """
    source = PROJECT_ROOT / "model_repository"
    for path in source.rglob("*"):
        if "__pycache__" in path.parts or path.name in ("model.onnx", "export.json"):
            continue
        destination = target / path.relative_to(source)
        if path.is_dir() and not path.is_symlink():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.unlink(missing_ok=True)
        if path.is_symlink():
            destination.symlink_to(path.readlink())
        else:
            shutil.copy2(path, destination)
    return target


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    return make_random_checkpoint(
        BUILD / f"mobilesam-random-seed{CHECKPOINT_SEED}.pt", CHECKPOINT_SEED
    )


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        model_repository=BUILD / "model_repository",
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        checkpoint_cache_dir=tmp_path_factory.mktemp("checkpoint-cache"),
    )


@pytest.fixture(scope="session")
def model_repository(settings: Settings, checkpoint_path: Path) -> Path:
    from export.__main__ import run_export

    copy_repository_layout(settings.model_repository)
    run_export(str(checkpoint_path), settings.model_repository)
    return settings.model_repository


@pytest.fixture(scope="session")
def sam(checkpoint_path: Path):
    """Upstream PyTorch MobileSAM with the same weights: the oracle."""
    from export.checkpoint import load_mobilesam

    return load_mobilesam(checkpoint_path)


@pytest.fixture(scope="session")
def triton_server(settings: Settings, model_repository: Path) -> Iterator[TritonServer]:
    server = TritonServer.from_settings(
        settings, log_path=BUILD / "logs" / "triton.log", work_dir=BUILD / "triton"
    )
    with server:
        server.wait_ready(settings.triton_ready_timeout_s)
        yield server


@pytest.fixture
def triton_client(triton_server: TritonServer):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=8)
    yield client
    client.close()


class ProxyProcess:
    """`python -m proxy` in its own process, exactly as `make run` starts it."""

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.extra_env = extra_env or {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        return dict(
            os.environ,
            PROXY_HOST="127.0.0.1",
            PROXY_PORT=str(self.port),
            TRITON_HOST=self.settings.triton_host,
            TRITON_HTTP_PORT=str(self.settings.triton_http_port),
            MODEL_REPOSITORY=str(self.settings.model_repository),
            **self.extra_env,
        )

    def start(self, timeout_s: float = 60) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            cwd=PROJECT_ROOT,
            env=self.environment(),
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("proxy did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def proxy(settings: Settings, triton_server: TritonServer) -> Iterator[ProxyProcess]:
    process = ProxyProcess(settings, BUILD / "logs" / "proxy.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def http(proxy: ProxyProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.base_url, timeout=120) as client:
        yield client
