"""Several Tritons behind one proxy: calls spread across them, and losing one keeps the service
answering.

The session's Triton and a second one of this module's own (so stopping it leaves the session
alone) serve the same repository; one proxy lists both in TRITON_ENDPOINTS. Steady load of
cached re-prompts (one decoder call each) must land within 20% evenly on the two, counted by
each Triton's own statistics. Then the second Triton stops under load: requests in flight may
end in a clean 503, every request after it succeeds, and the Triton is used again once it is
back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as triton_http

from common.settings import Settings
from serving.triton import TritonServer
from testkit.processes import ServerProcess, proxy_process

from .conftest import BUILD, another_triton
from .test_proxy_api import POINT, png_bytes, segment
from .test_shared_cache import proxy_metric

HEALTH_INTERVAL_S = 0.5
CONCURRENCY = 4
REQUESTS = 40  # ~50 ms of decoder each: a few seconds in all


@pytest.fixture(scope="module")
def second_triton(settings: Settings, triton_server: TritonServer) -> Iterator[TritonServer]:
    with another_triton(settings, "triton-second") as server:
        server.wait_ready(settings.triton_ready_timeout_s)
        yield server


@pytest.fixture(scope="module")
def balanced_proxy(
    settings: Settings, triton_server: TritonServer, second_triton: TritonServer
) -> Iterator[ServerProcess]:
    env = {
        "TRITON_ENDPOINTS": f"{triton_server.http_url},{second_triton.http_url}",
        "TRITON_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
    }
    with proxy_process(settings, BUILD / "logs" / "proxy-balanced.log", env, "/readyz") as proxy:
        yield proxy


def decoder_count(server: TritonServer, settings: Settings) -> int:
    client = triton_http.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(settings.decoder_model)["model_stats"][0]
        return int(stats["inference_count"])
    finally:
        client.close()


def counts(servers: list[TritonServer], settings: Settings) -> list[int]:
    return [decoder_count(server, settings) for server in servers]


def wait_for_endpoints(client: httpx.Client, healthy: int, ejected: int) -> None:
    """Until the proxy's health probes (every HEALTH_INTERVAL_S) report these counts."""
    deadline = time.monotonic() + 60
    while True:
        seen = [
            proxy_metric(client, f'proxy_triton_endpoints{{state="{state}"}}')
            for state in ("healthy", "ejected")
        ]
        if seen == [healthy, ejected]:
            return
        assert time.monotonic() < deadline, f"endpoints healthy/ejected: {seen}"
        time.sleep(HEALTH_INTERVAL_S / 2)


async def reprompt_load(
    base_url: str, image_id: str, requests: int, concurrency: int
) -> list[httpx.Response]:
    """`requests` re-prompts of a cached image, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def one() -> httpx.Response:
            async with gate:
                return await client.post(
                    "/segment-image", data={"image_id": image_id, "prompts": POINT}
                )

        return await asyncio.gather(*(one() for _ in range(requests)))


@pytest.fixture(scope="module")
def image_id(balanced_proxy: ServerProcess) -> str:
    with httpx.Client(base_url=balanced_proxy.base_url, timeout=120) as client:
        response = segment(client, png_bytes(seed=50))
    assert response.status_code == 200, response.text
    return response.json()["image_id"]


def test_steady_load_spreads_evenly_over_two_tritons(
    balanced_proxy, image_id, triton_server, second_triton, settings
) -> None:
    servers = [triton_server, second_triton]
    before = counts(servers, settings)
    responses = asyncio.run(reprompt_load(balanced_proxy.base_url, image_id, REQUESTS, CONCURRENCY))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    served = [after - start for after, start in zip(counts(servers, settings), before, strict=True)]
    assert sum(served) == REQUESTS, served  # one decoder call each, on one of the two
    assert min(served) >= 0.8 * max(served), f"uneven: {served}"


def test_losing_a_triton_keeps_the_service_answering(
    balanced_proxy, image_id, triton_server, second_triton, settings
) -> None:
    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        load = asyncio.ensure_future(
            reprompt_load(balanced_proxy.base_url, image_id, REQUESTS, CONCURRENCY)
        )
        await asyncio.sleep(0.5)  # the load is under way
        await asyncio.to_thread(second_triton.stop)
        during = await load
        after = await reprompt_load(balanced_proxy.base_url, image_id, 20, CONCURRENCY)
        return during, after

    servers = [triton_server, second_triton]
    survivor_before = decoder_count(triton_server, settings)
    during, after = asyncio.run(scenario())

    # In flight when it stopped: a clean 503 at worst, never a 500 or a hang.
    assert {r.status_code for r in during} <= {200, 503}, [r.text for r in during][:3]
    for response in during:
        if response.status_code == 503:
            assert response.json()["code"] == "triton_unavailable"
    # Afterwards every request succeeds, on the Triton that is left.
    assert [r.status_code for r in after] == [200] * len(after), [r.text for r in after][:3]
    assert decoder_count(triton_server, settings) >= survivor_before + len(after)

    with httpx.Client(base_url=balanced_proxy.base_url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        wait_for_endpoints(client, healthy=1, ejected=1)

        # Back up: re-admitted by the health probe, and used again.
        second_triton.start()
        second_triton.wait_ready(settings.triton_ready_timeout_s)
        wait_for_endpoints(client, healthy=2, ejected=0)
    before = counts(servers, settings)
    responses = asyncio.run(reprompt_load(balanced_proxy.base_url, image_id, 8, 2))
    assert all(r.status_code == 200 for r in responses)
    assert decoder_count(second_triton, settings) > before[1], "not used again once back"
