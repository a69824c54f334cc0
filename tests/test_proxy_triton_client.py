"""The Triton client against a recording stand-in for Triton: wire habits and error classes.

Failures are classified from tritonclient's exception types and HTTP status codes: the
stand-in answers with Triton's JSON error bodies and statuses, refuses connections or stalls.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp import web

from common.settings import Settings
from proxy import errors
from proxy.metrics import ProxyMetrics
from proxy.triton_client import TritonGateway
from testkit.ports import free_port

EMBEDDING = {"name": "image_embeddings", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}


async def _encode_once(port: int, answer, timeout_s: float = 5.0):
    """One encoder call through the gateway; returns (embedding or error, headers seen, metrics)."""
    seen: list[str] = []

    async def infer(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Accept-Encoding", ""))
        await request.read()
        return await answer()

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    metrics = ProxyMetrics()
    gateway = TritonGateway(Settings(triton_http_port=port, triton_timeout_s=timeout_s), metrics)
    try:
        result = await gateway.encode(np.zeros((8, 8, 3), dtype=np.uint8), (8, 8))
    except errors.ServiceError as exc:
        result = exc
    finally:
        await gateway.close()
        await runner.cleanup()
    return result, seen, metrics


def outcome_count(metrics: ProxyMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "proxy_triton_call_duration_seconds_count",
        {"model": "mobilesam_encoder", "outcome": outcome},
    )
    return value or 0.0


def test_tensors_are_asked_for_uncompressed() -> None:
    """aiohttp asks for gzip by default, and Triton then spends seconds compressing logits."""

    async def ok() -> web.Response:
        return web.json_response({"model_name": "mobilesam_encoder", "outputs": [EMBEDDING]})

    embedding, seen, metrics = asyncio.run(_encode_once(free_port(), ok))
    np.testing.assert_array_equal(embedding, [1, 2])
    assert seen == ["identity"]
    assert outcome_count(metrics, "ok") == 1


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        (503, errors.TritonUnavailable, "unavailable"),  # queue full, model unavailable
        (429, errors.TritonUnavailable, "unavailable"),
        (400, errors.TritonFailed, "error"),  # an input the model refuses
        (500, errors.TritonFailed, "error"),  # model.py raised
    ],
)
def test_triton_error_statuses_are_classified(status: int, error: type, outcome: str) -> None:
    async def refuse() -> web.Response:
        # Worded to mislead a classifier that reads messages instead of statuses.
        return web.json_response({"error": "queue is not ready"}, status=status)

    result, _, metrics = asyncio.run(_encode_once(free_port(), refuse))
    assert type(result) is error, result
    assert "queue is not ready" in result.detail
    assert outcome_count(metrics, outcome) == 1


def test_a_stalled_triton_is_a_timeout() -> None:
    async def stall() -> web.Response:
        await asyncio.sleep(1)  # far past the client's deadline
        return web.json_response({})

    result, _, metrics = asyncio.run(_encode_once(free_port(), stall, timeout_s=0.2))
    assert type(result) is errors.TritonTimeout
    assert "0.2 s" in result.detail
    assert outcome_count(metrics, "timeout") == 1


def test_an_unreachable_triton_is_unavailable() -> None:
    async def run():
        metrics = ProxyMetrics()
        gateway = TritonGateway(Settings(triton_http_port=free_port()), metrics)
        try:
            await gateway.encode(np.zeros((8, 8, 3), dtype=np.uint8), (8, 8))
        except errors.ServiceError as exc:
            return exc, metrics
        finally:
            await gateway.close()

    result, metrics = asyncio.run(run())
    assert type(result) is errors.TritonUnavailable
    assert outcome_count(metrics, "unavailable") == 1
