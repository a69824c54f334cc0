"""Session fixtures: a seeded random-init checkpoint, its export, a real Triton on free ports,
and the real proxy in front of it.

The official weights cannot be downloaded here, so the tests make a checkpoint of the official
architecture with a fixed seed and put it through the same export code as real weights. The
exported repository lives in build/ (git-ignored) and is reused while the checkpoint is the same.

Tests that need a Triton or a proxy process (through the fixtures below), or upstream's real
networks run on photographs, are marked `integration`; `make test-fast` runs the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.settings import PROJECT_ROOT, Settings
from export.random_checkpoint import make_random_checkpoint
from serving.triton import TritonServer
from testkit.ports import free_port
from testkit.processes import ServerProcess, proxy_process
from testkit.repository import copy_layout

BUILD = PROJECT_ROOT / "build" / "tests"
CHECKPOINT_SEED = 0
# Fixtures that start (or export for) a real Triton or proxy, or run upstream's networks on
# real photographs (test_everything_steps.py's `memoized`): a test using any of them,
# directly or through another fixture, is an integration test.
INTEGRATION_FIXTURES = frozenset({"model_repository", "triton_server", "proxy", "memoized"})


CONTAINER_TESTS = Path(__file__).parent / "containers"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/containers builds and runs the images (`make test-containers`): collected only
    when named on the command line, never by `make test`."""
    if collection_path != CONTAINER_TESTS:
        return None
    named = [Path(config.invocation_params.dir, arg.split("::")[0]) for arg in config.args]
    return None if any(p.resolve().is_relative_to(CONTAINER_TESTS) for p in named) else True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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

    copy_layout(settings.model_repository)
    run_export(str(checkpoint_path), settings.model_repository)
    return settings.model_repository


@pytest.fixture(scope="session")
def sam(checkpoint_path: Path):
    """Upstream PyTorch MobileSAM with the same weights: the oracle."""
    from export.checkpoint import load_mobilesam

    return load_mobilesam(checkpoint_path)


@pytest.fixture(scope="module")
def predictor(sam):
    """Upstream's `SamPredictor` over the oracle; per module, since `set_image` holds state."""
    from mobile_sam import SamPredictor

    return SamPredictor(sam)


def another_triton(settings: Settings, log_name: str) -> TritonServer:
    """A Triton (not started) on the session's repository and free ports of its own, for a
    module that stops it or needs a second one while the session's keeps serving."""
    return TritonServer.from_settings(
        settings,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_path=BUILD / "logs" / f"{log_name}.log",
        work_dir=BUILD / "triton",
    )


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


@pytest.fixture(scope="session")
def proxy(settings: Settings, triton_server: TritonServer) -> Iterator[ServerProcess]:
    with proxy_process(settings, BUILD / "logs" / "proxy.log") as process:
        yield process


@pytest.fixture
def http(proxy: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.base_url, timeout=120) as client:
        yield client
