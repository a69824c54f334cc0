"""Admission budgets, the request guard (deadline, disconnect, requests in flight) and the
cache under cancellation, in process: the mechanisms behind bounded work per request.

The same behaviour against the real proxy and Triton is in test_reliability.py.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from common.settings import Settings
from proxy.admission import Budget
from proxy.cache import CachedImage, EmbeddingCache
from proxy.errors import Overloaded
from proxy.everything.crops import crop_plan
from proxy.everything.params import AmgParams
from proxy.metrics import ProxyMetrics
from proxy.middleware import RequestGuard

# --- budgets ------------------------------------------------------------------------------------


def test_a_budget_lets_in_what_fits_and_queues_the_rest_in_order() -> None:
    async def scenario() -> list[str]:
        budget = Budget("units", 10)
        order: list[str] = []

        async def job(name: str, amount: int, hold_s: float) -> None:
            async with budget.hold(amount, wait_s=5):
                order.append(name)
                await asyncio.sleep(hold_s)

        await asyncio.gather(
            job("a", 6, 0.05), job("b", 6, 0.01), job("c", 3, 0.01), job("d", 4, 0.01)
        )
        assert budget.used == 0
        return order

    # c would fit beside a, but b came first: first come, first served.
    assert asyncio.run(scenario()) == ["a", "b", "c", "d"]


def test_a_full_budget_refuses_after_the_wait() -> None:
    async def scenario() -> None:
        budget = Budget("units", 4)
        async with budget.hold(4, wait_s=1):
            with pytest.raises(Overloaded) as refused:
                await budget.acquire(1, wait_s=0.05)
            assert refused.value.extensions == {"limit": 4, "budget": "units"}
            assert budget.used == 4 and not budget._waiters
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_gives_up_its_place() -> None:
    async def scenario() -> None:
        budget = Budget("units", 2)
        async with budget.hold(2, wait_s=1):
            waiting = asyncio.ensure_future(budget.acquire(2, wait_s=10))
            behind = asyncio.ensure_future(budget.acquire(1, wait_s=10))
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert await behind == 1  # served once the holder left, the cancelled one skipped
        assert budget.used == 1

    asyncio.run(scenario())


def test_more_than_a_whole_budget_runs_alone() -> None:
    async def scenario() -> None:
        budget = Budget("units", 4)
        async with budget.hold(100, wait_s=0.05):
            assert budget.used == 4

    asyncio.run(scenario())


# --- the cost of segment everything ---------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"crop_n_layers": 1},
        {"points_per_side": 64, "crop_n_layers": 3},
        {"points_per_side": 10, "crop_n_layers": 2, "crop_n_points_downscale_factor": 3},
    ],
)
def test_decoder_prompts_count_every_grid_point_of_every_crop(settings) -> None:
    params = AmgParams(**settings)
    planned = sum(len(job.points) for job in crop_plan((1200, 1600), params, 1024))
    assert params.decoder_prompts() == planned


def test_upstream_defaults_and_one_crop_layer_are_within_the_default_limit() -> None:
    limit = Settings().max_everything_prompts
    assert AmgParams().decoder_prompts() == 1024
    assert AmgParams(crop_n_layers=1).decoder_prompts() == 5 * 1024 <= limit
    assert AmgParams(points_per_side=64, crop_n_layers=3).decoder_prompts() == 348_160 > limit


# --- the request guard ------------------------------------------------------------------------


class Exchange:
    """One HTTP exchange as the ASGI server sees it: a body, then maybe a disconnect."""

    def __init__(self, disconnect_after_s: float | None = None) -> None:
        self.sent: list[dict] = []
        self._body_sent = False
        self._disconnect_after_s = disconnect_after_s
        self._done = asyncio.Event()

    async def receive(self) -> dict:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"x", "more_body": False}
        if self._disconnect_after_s is None:
            await self._done.wait()  # the server says "disconnect" once the answer is complete
        else:
            await asyncio.sleep(self._disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self._done.set()

    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    def body(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if "body" in m))


SCOPE = {"type": "http", "method": "POST", "path": "/segment-image", "headers": []}


def slow_app(events: list[str], work_s: float = 10.0):
    """Reads its body, then works for `work_s` (as if waiting on Triton), then answers."""

    async def app(scope, receive, send) -> None:
        await receive()
        try:
            await asyncio.sleep(work_s)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        events.append("answered")

    return app


def guard(app, **settings) -> tuple[RequestGuard, ProxyMetrics]:
    metrics = ProxyMetrics()
    return RequestGuard(app, Settings(**settings), metrics), metrics


def abandoned(metrics: ProxyMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("proxy_requests_abandoned_total", {"reason": reason})
    return value or 0.0


def test_past_the_deadline_the_work_is_cancelled_and_the_answer_is_504() -> None:
    events: list[str] = []
    middleware, metrics = guard(slow_app(events), request_timeout_s=0.1)
    exchange = Exchange()
    asyncio.run(middleware(SCOPE, exchange.receive, exchange.send))
    assert events == ["cancelled"]
    assert exchange.status() == 504
    assert exchange.body()["code"] == "deadline_exceeded"
    assert abandoned(metrics, "deadline") == 1


def test_an_event_stream_past_its_deadline_ends_with_an_error_event() -> None:
    """Its headers are sent: the 504 travels as the stream's last event instead."""
    events: list[str] = []

    async def streaming_app(scope, receive, send) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": b"event: progress\n", "more_body": True})
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    middleware, metrics = guard(streaming_app, request_timeout_s=0.1)
    exchange = Exchange()
    asyncio.run(middleware(SCOPE, exchange.receive, exchange.send))
    assert events == ["cancelled"] and exchange.status() == 200
    last = exchange.sent[-1]
    assert last["more_body"] is False
    name, data = last["body"].decode().strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: "))["code"] == "deadline_exceeded"
    assert abandoned(metrics, "deadline") == 1


def test_a_client_that_leaves_cancels_its_work() -> None:
    events: list[str] = []
    middleware, metrics = guard(slow_app(events))
    exchange = Exchange(disconnect_after_s=0.05)
    asyncio.run(middleware(SCOPE, exchange.receive, exchange.send))
    assert events == ["cancelled"]
    assert exchange.sent == []  # nobody to answer
    assert abandoned(metrics, "client_disconnect") == 1


def test_an_answered_request_is_not_abandoned() -> None:
    events: list[str] = []
    middleware, metrics = guard(slow_app(events, work_s=0.01))
    exchange = Exchange()
    asyncio.run(middleware(SCOPE, exchange.receive, exchange.send))
    assert events == ["answered"] and exchange.status() == 200
    assert abandoned(metrics, "client_disconnect") == abandoned(metrics, "deadline") == 0


def test_past_the_requests_in_flight_limit_the_answer_is_503_at_once() -> None:
    async def scenario() -> tuple[Exchange, list[str]]:
        events: list[str] = []
        middleware, _ = guard(slow_app(events, work_s=0.2), max_requests_in_flight=1)
        first, second = Exchange(), Exchange()
        busy = asyncio.ensure_future(middleware(SCOPE, first.receive, first.send))
        await asyncio.sleep(0.05)
        await middleware(SCOPE, second.receive, second.send)
        await busy
        assert first.status() == 200
        return second, events

    second, events = asyncio.run(scenario())
    assert second.status() == 503 and second.body()["code"] == "overloaded"
    headers = dict(second.sent[0]["headers"])
    assert int(headers[b"retry-after"]) > 0
    assert events == ["answered"]  # only the first one ran


def test_a_request_cut_short_by_shutdown_is_told_so() -> None:
    """Past the drain time the server cancels what is left: a 503 to retry, not a bare 500."""

    async def scenario() -> tuple[Exchange, list[str]]:
        events: list[str] = []
        middleware, metrics = guard(slow_app(events))
        exchange = Exchange()
        request = asyncio.ensure_future(middleware(SCOPE, exchange.receive, exchange.send))
        await asyncio.sleep(0.05)
        request.cancel()  # what uvicorn does once timeout_graceful_shutdown is over
        await request
        assert abandoned(metrics, "shutdown") == 1
        return exchange, events

    exchange, events = asyncio.run(scenario())
    assert events == ["cancelled"]
    assert exchange.status() == 503 and exchange.body()["code"] == "shutting_down"


def test_probes_are_never_limited() -> None:
    events: list[str] = []
    middleware, _ = guard(slow_app(events, work_s=0.01), max_requests_in_flight=0)
    exchange = Exchange()
    asyncio.run(middleware({**SCOPE, "path": "/readyz"}, exchange.receive, exchange.send))
    assert exchange.status() == 200


# --- the cache when the request computing an entry is cancelled ---------------------------------


def test_a_waiter_computes_the_entry_itself_when_the_computing_request_leaves() -> None:
    async def scenario() -> tuple[CachedImage, bool, int]:
        cache = EmbeddingCache(10**9)
        calls = 0

        async def compute() -> CachedImage:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return CachedImage(np.zeros(3, np.float32), (1, 1), (1, 1))

        first = asyncio.ensure_future(cache.get_or_compute(("m", "k"), compute))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(cache.get_or_compute(("m", "k"), compute))
        await asyncio.sleep(0.01)
        first.cancel()  # its client left
        entry, hit = await second
        return entry, hit, calls

    entry, hit, calls = asyncio.run(scenario())
    assert entry.original_size == (1, 1) and hit is False and calls == 2
