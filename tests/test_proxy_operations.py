"""Operations: readiness follows Triton, Triton failures map to 503/504, no torch in the proxy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from common.settings import PROJECT_ROOT, Settings
from serving.triton import TritonServer
from testkit.processes import proxy_process

from .conftest import BUILD, another_triton
from .test_proxy_api import POINT, assert_problem, png_bytes


def segment(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/segment-image", data={"prompts": POINT}, files={"file": ("a", data)})


@pytest.fixture(scope="module")
def own_triton(settings: Settings, model_repository) -> Iterator[TritonServer]:
    """A Triton of this module's own, so stopping it leaves the session's alone."""
    with another_triton(settings, "triton-restart") as server:
        server.wait_ready(120)
        yield server


def test_readyz_follows_triton_down_and_back_up(own_triton: TritonServer, settings) -> None:
    own = settings.model_copy(update={"triton_http_port": own_triton.http_port})
    proxy = proxy_process(own, BUILD / "logs" / "proxy-restart.log")
    proxy.start()
    try:
        with httpx.Client(base_url=proxy.base_url, timeout=120) as client:
            assert client.get("/readyz").status_code == 200

            own_triton.stop()
            down = client.get("/readyz")
            body = assert_problem(down, 503, "not_ready")
            assert body["triton"]["server"] is False
            assert int(down.headers["retry-after"]) > 0
            unavailable = segment(client, png_bytes(seed=20))
            assert_problem(unavailable, 503, "triton_unavailable")
            assert int(unavailable.headers["retry-after"]) > 0
            assert client.get("/healthz").status_code == 200, "the proxy itself stays alive"

            own_triton.start()
            own_triton.wait_ready(120)
            assert client.get("/readyz").status_code == 200
            assert segment(client, png_bytes(seed=20)).status_code == 200
    finally:
        proxy.stop()


def test_triton_deadline_is_a_504(settings, triton_server) -> None:
    proxy = proxy_process(
        settings, BUILD / "logs" / "proxy-timeout.log", extra_env={"TRITON_TIMEOUT_S": "0.01"}
    )
    proxy.start()
    try:
        with httpx.Client(base_url=proxy.base_url, timeout=60) as client:
            response = segment(client, png_bytes(seed=21))
            assert_problem(response, 504, "triton_timeout")
            assert "0.01 s" in response.json()["detail"]
    finally:
        proxy.stop()


def test_proxy_never_imports_torch() -> None:
    code = (
        "import sys, proxy.app, proxy.service, proxy.routes\n"
        "proxy.app.create_app()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=60)
