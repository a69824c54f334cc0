"""The Triton client's wire habits, checked against a recording stand-in for Triton."""

from __future__ import annotations

import asyncio

import numpy as np
from aiohttp import web

from proxy.metrics import ProxyMetrics
from proxy.triton_client import TritonGateway
from serving.settings import Settings

from .conftest import free_port


async def _encode_once(port: int) -> tuple[np.ndarray, list[str]]:
    seen: list[str] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        await request.read()
        output = {"name": "image_embeddings", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
        return web.json_response({"model_name": "mobilesam_encoder", "outputs": [output]})

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = Settings(triton_http_port=port)
    gateway = TritonGateway(settings, ProxyMetrics())
    try:
        image = np.zeros((8, 8, 3), dtype=np.uint8)
        embedding = await gateway.encode(image, (8, 8))
    finally:
        await gateway.close()
        await runner.cleanup()
    return embedding, seen


def test_tensors_are_asked_for_uncompressed() -> None:
    """aiohttp asks for gzip by default, and Triton then spends seconds compressing logits."""
    embedding, seen = asyncio.run(_encode_once(free_port()))
    np.testing.assert_array_equal(embedding, [1, 2])
    assert seen == ["identity"]
