"""The FastAPI application: lifespan-managed Triton client, cache and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from common.settings import Settings, get_settings
from proxy.admission import Admission
from proxy.cache import EmbeddingCache
from proxy.mask_store import MaskStore
from proxy.metrics import ProxyMetrics
from proxy.middleware import BodySizeLimit, RequestGuard, RequestMetrics
from proxy.page import install_page
from proxy.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from proxy.routes import router
from proxy.schemas import Problem
from proxy.service import ModelGateway, SegmentationService
from proxy.shared_cache import RedisTier
from proxy.triton_client import TritonGateway

# Room for the form fields (prompts, options) beside the file itself.
FORM_FIELDS_ALLOWANCE_BYTES = 1024 * 1024

DESCRIPTION = """
Segment Anything (MobileSAM) on CPU. Upload an image with point and box prompts to
`POST /segment-image`; the response's `image_id` re-prompts the same image without running
the encoder again, and a mask's `mask_id` refines that object. Errors are
`application/problem+json` with a machine-readable `code`. The web page is at `/`.
"""


GatewayFactory = Callable[[Settings, ProxyMetrics], ModelGateway]


def shared_tier(settings: Settings, metrics: ProxyMetrics) -> RedisTier | None:
    """Redis behind the local LRUs of embeddings and masks when REDIS_URL is set (several
    proxy replicas)."""
    if not settings.redis_url:
        return None
    return RedisTier(
        settings.redis_url,
        ttl_s=settings.redis_ttl_s,
        timeout_s=settings.redis_timeout_s,
        max_entry_bytes=settings.redis_max_entry_bytes,
        metrics=metrics,
    )


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
        shared = shared_tier(settings, metrics)
        cache = EmbeddingCache(settings.embedding_cache_bytes, shared)
        masks = MaskStore(settings.mask_cache_bytes, shared)
        app.state.service = SegmentationService(
            settings, gateway, cache, metrics, masks, Admission(settings, metrics)
        )
        try:
            yield
        finally:
            await gateway.close()
            await cache.close()  # and the shared tier the masks use too

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
    install_page(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes + FORM_FIELDS_ALLOWANCE_BYTES)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every status
    app.openapi = lambda: openapi(app)
    return app


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, with every error response as what it is: a `Problem` in
    application/problem+json (FastAPI would describe its own validation error format), the
    Retry-After header of a 503, and optional form parts without FastAPI's `null` alternative
    (a multipart form says "absent" by leaving the part out; clients and generators that see
    `anyOf [file, null]` would not recognise the file part)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Problem"] = Problem.model_json_schema()
        for name, component in components.items():
            if name.startswith("Body_"):  # FastAPI's multipart form of an operation
                for field, field_schema in component.get("properties", {}).items():
                    component["properties"][field] = without_null(field_schema)
        problem = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for status, response in operation.get("responses", {}).items():
                if int(status) >= 400:
                    response["content"] = problem
                if int(status) == 503:
                    response["headers"] = {
                        "Retry-After": {
                            "description": "Seconds to wait before retrying.",
                            "schema": {"type": "integer"},
                        }
                    }
        app.openapi_schema = schema
    return app.openapi_schema


def without_null(schema: dict) -> dict:
    """`anyOf [X, null]` -> X, keeping the title, description and default."""
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if len(options) != 1 or len(schema.get("anyOf", [])) != 2:
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    if rest.get("default", 0) is None:
        rest.pop("default")
    return {**options[0], **rest}
