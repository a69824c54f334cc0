"""The FastAPI application: lifespan-managed Triton client, cache and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from proxy.cache import EmbeddingCache
from proxy.metrics import ProxyMetrics
from proxy.middleware import BodySizeLimit, RequestMetrics
from proxy.problems import install_problem_handlers
from proxy.routes import router
from proxy.service import SegmentationService
from proxy.triton_client import TritonGateway
from serving.settings import Settings, get_settings

# Room for the form fields (prompts, options) beside the file itself.
FORM_FIELDS_ALLOWANCE_BYTES = 1024 * 1024

DESCRIPTION = """
Segment Anything (MobileSAM) on CPU. Upload an image with point and box prompts to
`POST /segment-image`; the response's `image_id` re-prompts the same image without running
the encoder again. Errors are `application/problem+json` with a machine-readable `code`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = ProxyMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = TritonGateway(settings, metrics)
        cache = EmbeddingCache(settings.embedding_cache_bytes)
        app.state.service = SegmentationService(settings, gateway, cache, metrics)
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="MobileSAM on Triton",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_problem_handlers(app)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes + FORM_FIELDS_ALLOWANCE_BYTES)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every status
    return app
