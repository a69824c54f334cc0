"""The proxy's Triton endpoint pool against stand-in Tritons (small aiohttp servers that answer
the readiness routes): balancing, ejection and retry, re-admission, and DNS discovery.

The real thing, two real Tritons under load, is tests/test_triton_replicas.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from tritonclient.utils import InferenceServerException

from proxy.endpoints import EndpointPool, join_host_port, split_host_port
from proxy.metrics import ProxyMetrics
from testkit.ports import free_port

MODEL = "mobilesam_decoder"


class StandIn:
    """Answers `/v2/health/ready` and model metadata (`/v2/models/{model}`), counting the
    metadata calls; with `hold`, each call waits until that event is set."""

    def __init__(self, status: int = 200) -> None:
        self.port = free_port()
        self.status = status
        self.hold: asyncio.Event | None = None
        self.calls = 0
        self.ready = True

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def model(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.status != 200:
            return web.json_response({"error": "queue full"}, status=self.status)
        return web.json_response({"name": request.match_info["model"]})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(*stand_ins: StandIn) -> AsyncIterator[None]:
    runners = []
    for stand_in in stand_ins:
        app = web.Application()
        app.router.add_get("/v2/health/ready", stand_in.health)
        app.router.add_get("/v2/models/{model}", stand_in.model)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", stand_in.port).start()
        runners.append(runner)
    try:
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


def pool_of(addresses: list[str], metrics: ProxyMetrics | None = None) -> EndpointPool:
    return EndpointPool(addresses, 5.0, 0.2, metrics or ProxyMetrics())


def gauge(metrics: ProxyMetrics, state: str) -> float:
    return metrics.registry.get_sample_value("proxy_triton_endpoints", {"state": state})


def test_addresses_are_split_and_joined() -> None:
    assert split_host_port("triton-pods:8000") == ("triton-pods", 8000)
    assert split_host_port("[fd00::1]:8000") == ("fd00::1", 8000)
    assert join_host_port("fd00::1", 8000) == "[fd00::1]:8000"
    with pytest.raises(ValueError, match="host:port"):
        split_host_port("triton")


def test_equal_endpoints_take_calls_in_turn() -> None:
    a, b = StandIn(), StandIn()

    async def scenario() -> None:
        async with serving(a, b):
            pool = pool_of([a.address, b.address])
            try:
                for _ in range(10):
                    assert await pool.get_model_metadata(MODEL) == {"name": MODEL}
            finally:
                await pool.close()

    asyncio.run(scenario())
    assert (a.calls, b.calls) == (5, 5)


def test_a_busy_endpoint_gets_fewer_calls() -> None:
    """Least in flight: while the slow endpoint holds a call, the others go elsewhere."""
    slow, fast = StandIn(), StandIn()

    async def scenario() -> None:
        slow.hold = asyncio.Event()
        async with serving(slow, fast):
            pool = pool_of([slow.address, fast.address])
            try:
                # Two at once: one each; the slow one's stays in flight.
                first = asyncio.gather(*(pool.get_model_metadata(MODEL) for _ in range(2)))
                while fast.calls < 1 or slow.calls < 1:
                    await asyncio.sleep(0.01)
                for _ in range(4):
                    await pool.get_model_metadata(MODEL)
                slow.hold.set()
                await first
            finally:
                await pool.close()

    asyncio.run(scenario())
    assert (slow.calls, fast.calls) == (1, 5)


def test_an_unreachable_endpoint_is_ejected_and_the_call_tried_elsewhere() -> None:
    live = StandIn()
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    metrics = ProxyMetrics()

    async def scenario() -> None:
        async with serving(live):
            pool = pool_of([gone, live.address], metrics)
            try:
                for _ in range(4):
                    assert await pool.get_model_metadata(MODEL) == {"name": MODEL}
            finally:
                await pool.close()

    asyncio.run(scenario())
    assert live.calls == 4
    assert metrics.registry.get_sample_value("proxy_triton_endpoint_ejections_total") == 1
    assert (gauge(metrics, "healthy"), gauge(metrics, "ejected")) == (1, 1)


def test_tritons_answers_are_not_retried() -> None:
    """A full queue (503) is Triton's answer, not a lost connection: retrying elsewhere would
    multiply the load exactly when the service is saturated."""
    full, also_full = StandIn(status=503), StandIn(status=503)

    async def scenario() -> None:
        async with serving(full, also_full):
            pool = pool_of([full.address, also_full.address])
            try:
                with pytest.raises(InferenceServerException):
                    await pool.get_model_metadata(MODEL)
            finally:
                await pool.close()

    asyncio.run(scenario())
    assert full.calls + also_full.calls == 1


def test_not_ready_is_ejected_and_ready_again_readmitted() -> None:
    a, b = StandIn(), StandIn()
    metrics = ProxyMetrics()

    async def scenario() -> None:
        async with serving(a, b):
            pool = pool_of([a.address, b.address], metrics)
            try:
                a.ready = False
                assert await pool.is_server_ready() is True  # b is
                assert (gauge(metrics, "healthy"), gauge(metrics, "ejected")) == (1, 1)
                for _ in range(4):
                    await pool.get_model_metadata(MODEL)
                assert (a.calls, b.calls) == (0, 4)
                a.ready = b.ready = False
                assert await pool.is_server_ready() is False
                a.ready = True
                assert await pool.is_server_ready() is True
                assert (gauge(metrics, "healthy"), gauge(metrics, "ejected")) == (1, 1)
                await pool.get_model_metadata(MODEL)
                assert a.calls == 1
            finally:
                await pool.close()

    asyncio.run(scenario())


def test_a_name_is_one_endpoint_per_address(monkeypatch) -> None:
    """A headless Service's name resolves to its ready pods: each becomes an endpoint, and a
    pod that leaves the answer leaves the pool. A failed lookup keeps what was known."""
    a = StandIn()
    answers: list[list[str] | None] = [["127.0.0.1"], ["127.0.0.1", "127.0.0.2"], None]

    async def getaddrinfo(host, port, **kwargs):
        assert host == "triton-pods"
        addresses = answers[0]
        if addresses is None:
            raise socket.gaierror("temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in addresses]

    async def scenario() -> list[list[str]]:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        seen = []
        async with serving(a):
            pool = pool_of([f"triton-pods:{a.port}"])
            try:
                for _ in range(len(answers)):
                    await pool.refresh()
                    seen.append([e.address for e in pool.endpoints()])
                    answers.pop(0)
            finally:
                await pool.close()
        return seen

    seen = asyncio.run(scenario())
    first, both = f"127.0.0.1:{a.port}", f"127.0.0.2:{a.port}"
    assert seen == [[first], [first, both], [first, both]]
