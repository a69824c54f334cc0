"""A closed-loop HTTP load generator: N workers, each sends its next request when one returns.

Bounded twice, because a benchmark on a shared 2-core machine must end: at most
`max_requests` are started, and none is started after `max_seconds`; requests in flight then
finish (each has its own timeout). Latency percentiles count successful requests only;
failures are counted by status code (or exception name), never silently dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Request:
    """One multipart POST: form fields plus an optional file."""

    path: str
    data: dict[str, str]
    file: tuple[str, bytes, str] | None = None  # (filename, bytes, content type)


RequestFactory = Callable[[int], Request]


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not samples:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], not {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    return {
        "p50": percentile(latencies_ms, 50),
        "p95": percentile(latencies_ms, 95),
        "p99": percentile(latencies_ms, 99),
        "mean": sum(latencies_ms) / len(latencies_ms),
        "min": min(latencies_ms),
        "max": max(latencies_ms),
    }


@dataclass
class LoadResult:
    """One workload at one concurrency level against one server."""

    target: str
    workload: str
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput: float  # successful requests per second
    latency_ms: dict[str, float]
    stopped_by: str  # "count" or "time"
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean of the proxy's timings_ms

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mean_stages(bodies: Sequence[dict]) -> dict[str, float]:
    """Average of each `timings_ms` stage over the responses that report one."""
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for body in bodies:
        for stage, value in (body.get("timings_ms") or {}).items():
            totals[stage] += value
            counts[stage] += 1
    return {stage: totals[stage] / counts[stage] for stage in totals}


async def run_load(
    base_url: str,
    factory: RequestFactory,
    *,
    target: str,
    workload: str,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 120.0,
    keep_bodies: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadResult:
    """Drive `concurrency` workers until `max_requests` have started or `max_seconds` passed.

    `transport` replaces the network (tests use `httpx.MockTransport`).
    """
    if concurrency < 1 or max_requests < 1:
        raise ValueError("concurrency and max_requests must be positive")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    bodies: list[dict] = []
    issued = 0
    stopped_by = "count"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits, transport=transport
    ) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal issued, stopped_by
            while True:
                if issued >= max_requests:
                    return
                if time.perf_counter() >= deadline:
                    stopped_by = "time"
                    return
                index = issued
                issued += 1
                request = factory(index)
                files = {"file": request.file} if request.file else None
                sent = time.perf_counter()
                try:
                    response = await client.post(request.path, data=request.data, files=files)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                elapsed_ms = (time.perf_counter() - sent) * 1000
                if response.status_code == 200:
                    latencies.append(elapsed_ms)
                    if keep_bodies:
                        body = response.json()
                        bodies.append({"timings_ms": body.get("timings_ms")})
                else:
                    errors[str(response.status_code)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    return LoadResult(
        target=target,
        workload=workload,
        concurrency=concurrency,
        requests=issued,
        ok=len(latencies),
        errors=dict(errors),
        duration_s=round(duration, 3),
        throughput=len(latencies) / duration if duration > 0 else 0.0,
        latency_ms=summarize(latencies),
        stopped_by=stopped_by,
        stage_ms=mean_stages(bodies),
    )
