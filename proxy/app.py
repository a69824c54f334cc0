"""The FastAPI application: lifespan-managed Triton client, cache and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.settings import Settings, get_settings
from proxy.admission import Admission
from proxy.cache import EmbeddingCache
from proxy.metrics import ProxyMetrics
from proxy.middleware import BodySizeLimit, RequestGuard, RequestMetrics
from proxy.problems import install_problem_handlers
from proxy.routes import router
from proxy.service import ModelGateway, SegmentationService
from proxy.triton_client import TritonGateway

# Room for the form fields (prompts, options) beside the file itself.
FORM_FIELDS_ALLOWANCE_BYTES = 1024 * 1024

DESCRIPTION = """
Segment Anything (MobileSAM) on CPU. Upload an image with point and box prompts to
`POST /segment-image`; the response's `image_id` re-prompts the same image without running
the encoder again. Errors are `application/problem+json` with a machine-readable `code`.
"""


GatewayFactory = Callable[[Settings, ProxyMetrics], ModelGateway]


def create_app(
    settings: Settings | None = None, gateway_factory: GatewayFactory = TritonGateway
) -> FastAPI:
    """The app; `gateway_factory` makes the models' client when the app starts (Triton's,
    or a stand-in in tests)."""
    settings = settings or get_settings()
    metrics = ProxyMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = gateway_factory(settings, metrics)
        cache = EmbeddingCache(settings.embedding_cache_bytes)
        admission = Admission(settings, metrics)
        app.state.service = SegmentationService(settings, gateway, cache, metrics, admission)
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
    install_problem_handlers(app, settings)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes + FORM_FIELDS_ALLOWANCE_BYTES)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every status
    return app
