"""Server-sent events for segment-everything: progress while it runs, then the result.

A client that sends `Accept: text/event-stream` gets, on the same route and with the same
form, a stream instead of one JSON document:

    event: progress        data: {"done": 128, "total": 1024}     grid points decoded so far
    event: result          data: the JSON body the plain request returns
    event: error           data: a problem document (RFC 9457), if the run fails midway

Nothing is kept once the stream ends: the run lives as long as its request, and a client that
disconnects cancels it. Progress is coalesced (the latest count wins), so a slow reader costs
no memory. A request refused before the run starts (bad image, bad parameter) is a plain
problem+json response with its HTTP status, as without streaming.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from proxy import errors
from proxy.everything.pipeline import Progress
from proxy.problems import RETRY_LATER, problem_body, status_of

log = logging.getLogger("proxy")

EVENT_STREAM = "text/event-stream"


def wants_event_stream(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return EVENT_STREAM in (part.split(";")[0].strip() for part in accept.split(","))


def event(name: str, data: str) -> bytes:
    """One SSE message; `data` is JSON, which never contains a raw newline."""
    return f"event: {name}\ndata: {data}\n\n".encode()


def error_event(exc: BaseException, retry_after_s: int) -> bytes:
    if isinstance(exc, errors.ServiceError):
        extensions: dict[str, Any] = dict(exc.extensions)
        if isinstance(exc, RETRY_LATER):
            extensions["retry_after_s"] = retry_after_s
        body = problem_body(status_of(exc), exc.code, exc.detail, **extensions)
    else:
        log.error("unhandled error in an event stream", exc_info=exc)
        body = problem_body(500, "internal_error", "an unexpected error occurred")
    return event("error", json.dumps(body))


async def progress_events(
    run: Callable[[Progress], Awaitable[BaseModel]], retry_after_s: int
) -> AsyncIterator[bytes]:
    """Runs `run(progress)` and yields its progress, then its result (or error), as SSE."""
    latest: tuple[int, int] | None = None
    changed = asyncio.Event()

    def progress(done: int, total: int) -> None:
        nonlocal latest
        latest = (done, total)
        changed.set()

    task = asyncio.ensure_future(run(progress))
    try:
        while True:
            waiter = asyncio.ensure_future(changed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if changed.is_set():
                changed.clear()
                done, total = latest  # type: ignore[misc]
                yield event("progress", json.dumps({"done": done, "total": total}))
            if task.done():
                break
        try:
            result = task.result()
        except Exception as exc:  # every failure becomes an error event
            yield error_event(exc, retry_after_s)
        else:
            yield event("result", result.model_dump_json())
    finally:
        if not task.done():  # the client went away: stop the run
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def event_stream_response(
    run: Callable[[Progress], Awaitable[BaseModel]], retry_after_s: int
) -> StreamingResponse:
    return StreamingResponse(
        progress_events(run, retry_after_s),
        media_type=EVENT_STREAM,
        # No caching, and no buffering by a reverse proxy (nginx honours this header).
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
