"""ASGI middleware: every request bounded (a place in flight, a deadline, cancellation when
its client leaves), the upload size enforced while the body streams in, and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.settings import Settings
from proxy.errors import DeadlineExceeded, ServiceError, ShuttingDown
from proxy.events import EVENT_STREAM, error_event
from proxy.metrics import ProxyMetrics
from proxy.problems import PROBLEM_MEDIA_TYPE, problem_body, status_of

log = logging.getLogger("proxy")

# Always answered at once, outside the limits: probes and scrapes must see an overloaded proxy.
UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def send_problem(
    send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra
) -> None:
    body = json.dumps(problem_body(status, code, detail, **extra)).encode()
    raw_headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Bounds every request in time and in number, and stops its work when nobody waits for it.

    - At most `max_requests_in_flight` requests at once; past it, 503 `overloaded` at once.
    - An overall deadline (`request_timeout_s`): past it the request's task is cancelled, so no
      further Triton call is made for it, and the client gets 504 `deadline_exceeded`.
    - Once the body has been read, the connection is watched: when the client disconnects
      before its answer, the request's task is cancelled the same way.
    Cancellation reaches every await of the request: the Triton call in flight is abandoned
    and segment-everything's pending decoder calls are cancelled (pipeline.windowed).
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ProxyMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.settings.max_requests_in_flight:
            self.metrics.refused.labels(reason="requests_in_flight").inc()
            await send_problem(
                send,
                503,
                "overloaded",
                f"the proxy is at its limit of {self.settings.max_requests_in_flight} requests "
                "in flight; retry shortly",
                {"Retry-After": str(self.settings.triton_retry_after_s)},
                limit=self.settings.max_requests_in_flight,
                budget="requests",
            )
            return
        self.in_flight += 1
        self.metrics.requests_in_flight.set(self.in_flight)
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.requests_in_flight.set(self.in_flight)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_read = asyncio.Event()
        client_gone = asyncio.Event()
        response = {"started": False, "done": False, "stream": False}

        async def watched_receive() -> Message:
            if body_read.is_set():  # only the disconnect is left to hear: the watcher hears it
                await client_gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                headers = dict(message.get("headers", []))
                content_type = headers.get(b"content-type", b"").decode("latin-1")
                response["stream"] = content_type.startswith(EVENT_STREAM)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                response["done"] = True
            await send(message)

        work = asyncio.ensure_future(self.app(scope, watched_receive, watched_send))

        async def watch_client() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not response["done"]:  # after a complete answer, a disconnect is the norm
                client_gone.set()
                work.cancel()

        watcher = asyncio.ensure_future(watch_client())

        async def stop(reason: str, error: ServiceError, headers: dict | None = None) -> None:
            """Cancel the request's work; tell its client why, if it is there to hear: as a
            problem response, or, in an event stream already under way, as its last event."""
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            self._abandoned(scope, reason)
            if client_gone.is_set() or response["done"]:
                return
            if not response["started"]:
                await send_problem(
                    send, status_of(error), error.code, error.detail, headers, **error.extensions
                )
            elif response["stream"]:
                retry_after = self.settings.triton_retry_after_s
                last = error_event(error, retry_after)
                await send({"type": "http.response.body", "body": last, "more_body": False})

        try:
            done, _ = await asyncio.wait({work}, timeout=self.settings.request_timeout_s)
            if work not in done:
                limit = self.settings.request_timeout_s
                await stop(
                    "deadline",
                    DeadlineExceeded(
                        f"the request did not finish within {limit:g} s; "
                        "its remaining work was dropped",
                        limit_s=limit,
                    ),
                )
            elif work.cancelled():
                self._abandoned(scope, "client_disconnect")
            else:
                work.result()  # re-raise what the app raised
        except asyncio.CancelledError:
            # The server is shutting down and its drain time (DRAIN_TIMEOUT_S) is over: the
            # request's work stops, and its client hears so, rather than a bare 500.
            await stop(
                "shutdown",
                ShuttingDown("the proxy is shutting down; retry (another replica may answer)"),
                {"Retry-After": str(self.settings.triton_retry_after_s)},
            )
        finally:
            watcher.cancel()

    def _abandoned(self, scope: Scope, reason: str) -> None:
        self.metrics.abandoned.labels(reason=reason).inc()
        log.info("%s %s abandoned: %s", scope["method"], scope["path"], reason)


class BodySizeLimit:
    """Answers 413 as soon as a request body passes `limit` bytes, without buffering it.

    The Content-Length header is checked first; chunked bodies are counted as they arrive.
    Once over the limit the app sees a disconnect, and its response is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send, int(declared))
            return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                if not response_started:
                    response_started = True
                    await self._reject(send, received)
                return
            response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._reject(send, received)

    async def _reject(self, send: Send, size: int) -> None:
        await send_problem(
            send,
            413,
            "payload_too_large",
            f"request body is over the limit of {self.limit} bytes (at least {size} bytes sent)",
            {"Connection": "close"},  # the rest of the body is not read
            limit_bytes=self.limit,
        )


class RequestMetrics:
    """Counts and times every request by route template (not raw path), method and status."""

    def __init__(self, app: ASGIApp, metrics: ProxyMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # no answer was sent: the client left first (nginx's "client closed")

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(route=path, method=method, status=str(status)).inc()
            self.metrics.request_latency.labels(route=path, method=method).observe(
                time.perf_counter() - started
            )
