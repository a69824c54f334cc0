"""HTTP routes: form parsing, then the service's steps in order (see `proxy.service`)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.settings import Settings
from proxy.encodings import OutputFormat
from proxy.errors import ImageRequired, PayloadTooLarge
from proxy.events import EVENT_STREAM, event_stream_response, wants_event_stream
from proxy.everything.params import AmgParams
from proxy.everything.pipeline import Progress
from proxy.metrics import ProxyMetrics
from proxy.problems import problem_response
from proxy.schemas import EmbedResponse, EverythingResponse, SegmentResponse
from proxy.service import EmbeddedImage, EverythingResult, SegmentationService, Work
from proxy.timings import Timings

router = APIRouter()

IMAGE_ID_PATTERN = "^[0-9a-f]{64}$"  # the SHA-256 of the uploaded file, in hex
PROMPTS_EXAMPLE = '[{"points": [[320, 240]], "labels": [1]}, {"box": [10, 20, 200, 180]}]'
# Error responses (application/problem+json, schema `Problem`: see proxy.app.openapi).
PROBLEM_RESPONSES = {
    404: {"description": "Unknown image_id (not cached): upload the file again."},
    413: {"description": "Upload over the byte limit."},
    415: {"description": "Not an image, or a format other than JPEG/PNG/WebP/BMP/TIFF."},
    422: {
        "description": "Invalid image (truncated, too many pixels), prompts or parameters, "
        "or a segment-everything run over the prompt limit."
    },
    502: {"description": "Triton answered with an error."},
    503: {"description": "Triton unavailable, or the proxy at a limit; see Retry-After."},
    504: {"description": "Triton or the request's overall deadline ran out."},
}


def get_service(request: Request) -> SegmentationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ProxyMetrics:
    return request.app.state.metrics


Service = Annotated[SegmentationService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def request_scope() -> AsyncIterator[AsyncExitStack]:
    """What a request holds (its share of the admission budgets), released when it is done."""
    async with AsyncExitStack() as scope:
        yield scope


Scope = Annotated[AsyncExitStack, Depends(request_scope)]


async def read_upload(
    file: UploadFile | None,
    image_id: str | None,
    limit: int,
    service: SegmentationService,
    scope: AsyncExitStack,
) -> bytes | None:
    """The uploaded bytes, or None when an image_id is given instead; exactly one is allowed.

    The multipart parser has spooled the file to disk; it is read into memory once admitted.
    """
    if (file is None) == (image_id is None):
        raise ImageRequired("send exactly one of `file` (an image) or `image_id`")
    if file is None:
        return None
    if file.size is not None and file.size > limit:
        raise PayloadTooLarge(f"file is over the limit of {limit} bytes", limit_bytes=limit)
    await service.admit_upload(min(file.size or limit, limit), scope)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"file is over the limit of {limit} bytes", limit_bytes=limit)
    return data


@router.post(
    "/embed-image",
    response_model=EmbedResponse,
    responses=PROBLEM_RESPONSES,
    summary="Encode an image once and get its image_id for later prompts",
)
async def embed_image(
    service: Service,
    settings: AppSettings,
    scope: Scope,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP or TIFF")],
) -> EmbedResponse:
    timings = Timings()
    data = await read_upload(file, None, settings.max_upload_bytes, service, scope)
    opened = await service.open_image(data, None, Work.EMBED, timings, scope)
    image = await service.embed(opened, timings)
    height, width = image.size
    return EmbedResponse(
        image_id=image.image_id,
        width=width,
        height=height,
        cache_hit=image.cache_hit,
        timings_ms=timings.report(),
    )


UPSTREAM = AmgParams()  # upstream's defaults


def amg_form(name: str, description: str):
    """A segment-everything form field; its range (AmgParams.LIMITS) is documented in the
    schema and checked by AmgParams, so that a value out of range is `invalid_parameter`."""
    low, high = AmgParams.LIMITS[name]
    return Form(
        description=f"{description}; {low:g} to {high:g}.",
        json_schema_extra={"minimum": low, "maximum": high},
    )


def amg_params(
    points_per_side: Annotated[
        int, amg_form("points_per_side", "Grid of n x n points on the whole image")
    ] = UPSTREAM.points_per_side,
    points_per_batch: Annotated[
        int, amg_form("points_per_batch", "Prompts per decoder call")
    ] = UPSTREAM.points_per_batch,
    pred_iou_thresh: Annotated[
        float,
        amg_form("pred_iou_thresh", "Keep masks whose predicted IoU is above (<= 0 disables)"),
    ] = UPSTREAM.pred_iou_thresh,
    stability_score_thresh: Annotated[
        float,
        amg_form(
            "stability_score_thresh", "Keep masks with a stability score at least (0 disables)"
        ),
    ] = UPSTREAM.stability_score_thresh,
    stability_score_offset: Annotated[
        float, amg_form("stability_score_offset", "Logit offset of the stability score")
    ] = UPSTREAM.stability_score_offset,
    box_nms_thresh: Annotated[
        float, amg_form("box_nms_thresh", "Box IoU above which a mask is a duplicate in a crop")
    ] = UPSTREAM.box_nms_thresh,
    crop_n_layers: Annotated[
        int, amg_form("crop_n_layers", "Layers of overlapping crops after the whole image")
    ] = UPSTREAM.crop_n_layers,
    crop_nms_thresh: Annotated[
        float, amg_form("crop_nms_thresh", "Box IoU above which a mask is a duplicate across crops")
    ] = UPSTREAM.crop_nms_thresh,
    crop_overlap_ratio: Annotated[
        float, amg_form("crop_overlap_ratio", "Overlap of first-layer crops, of the short side")
    ] = UPSTREAM.crop_overlap_ratio,
    crop_n_points_downscale_factor: Annotated[
        int,
        amg_form(
            "crop_n_points_downscale_factor", "Points per side divided by this per crop layer"
        ),
    ] = UPSTREAM.crop_n_points_downscale_factor,
    min_mask_region_area: Annotated[
        int,
        amg_form(
            "min_mask_region_area", "Fill holes and remove islands below this area (0 disables)"
        ),
    ] = UPSTREAM.min_mask_region_area,
) -> AmgParams:
    """Segment-everything settings: upstream's names and defaults, overridable per request."""
    return AmgParams.from_mapping(locals())


@router.post(
    "/segment-image",
    response_model=SegmentResponse | EverythingResponse,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "content": {"image/png": {}, EVENT_STREAM: {}},
            "description": (
                "JSON. Without prompts: with `Accept: image/png`, the overlay alone; with "
                "`Accept: text/event-stream`, server-sent events: `progress` "
                '({"done": points decoded, "total": points}), then `result` (the JSON body) '
                "or `error` (a problem document)."
            ),
        },
    },
    summary="Segment objects given point and box prompts, or everything without prompts",
)
async def segment_image(
    request: Request,
    service: Service,
    settings: AppSettings,
    scope: Scope,
    params: Annotated[AmgParams, Depends(amg_params)],
    file: Annotated[UploadFile | None, File(description="JPEG, PNG, WebP, BMP or TIFF")] = None,
    image_id: Annotated[
        str | None,
        Form(
            description="From an earlier response or POST /embed-image.",
            pattern=IMAGE_ID_PATTERN,
        ),
    ] = None,
    prompts: Annotated[
        str | None,
        Form(
            description=(
                "JSON list; each item {points: [[x, y], ...], labels: [1|0, ...], "
                "box: [x0, y0, x1, y1], mask_id: from an earlier answer, to refine it} in "
                "original-image pixels. Several items are several objects. Omit to segment "
                "everything."
            ),
            examples=[PROMPTS_EXAMPLE],
        ),
    ] = None,
    multimask_output: Annotated[
        bool, Form(description="Three candidate masks per prompt instead of one.")
    ] = True,
    output_format: Annotated[OutputFormat, Form(description="Mask encoding.")] = OutputFormat.RLE,
    return_overlay: Annotated[
        bool, Form(description="Segment everything: add a PNG of the masks over the image.")
    ] = False,
) -> SegmentResponse | EverythingResponse | Response:
    timings = Timings()
    everything = prompts is None or not prompts.strip()
    if everything:
        service.check_everything_cost(params)  # before anything is read or decoded
        await service.admit_everything(scope)
    data = await read_upload(file, image_id, settings.max_upload_bytes, service, scope)
    work = Work.EVERYTHING if everything else Work.PROMPTS
    image = await service.open_image(data, image_id, work, timings, scope)  # size now known
    if everything:
        embedded = await service.embed(image, timings)
        return await segment_everything(
            request, service, embedded, params, output_format, return_overlay, timings
        )
    parsed = await service.parse_prompts(prompts, image)  # before any inference
    embedded = await service.embed(image, timings)
    results = await service.segment(embedded, parsed, multimask_output, output_format, timings)
    height, width = embedded.size
    return SegmentResponse(
        image_id=embedded.image_id,
        width=width,
        height=height,
        cache_hit=embedded.cache_hit,
        results=[{"masks": records} for records in results],
        timings_ms=timings.report(),
    )


async def segment_everything(
    request: Request,
    service: SegmentationService,
    image: EmbeddedImage,
    params: AmgParams,
    output_format: OutputFormat,
    return_overlay: bool,
    timings: Timings,
) -> EverythingResponse | Response:
    if wants_event_stream(request):

        async def run(progress: Progress) -> EverythingResponse:
            result = await service.segment_everything(
                image, params, output_format, return_overlay, timings, progress
            )
            return everything_response(image, result, timings)

        return event_stream_response(run, service.settings.triton_retry_after_s)
    png_only = wants_png(request)
    result = await service.segment_everything(
        image, params, output_format, return_overlay or png_only, timings
    )
    if png_only:
        return Response(
            result.overlay_png,
            media_type="image/png",
            headers={"X-Object-Count": str(len(result.records)), "X-Image-Id": image.image_id},
        )
    return everything_response(image, result, timings)


def everything_response(
    image: EmbeddedImage, result: EverythingResult, timings: Timings
) -> EverythingResponse:
    height, width = image.size
    return EverythingResponse(
        image_id=image.image_id,
        width=width,
        height=height,
        cache_hit=image.cache_hit,
        count=len(result.records),
        masks=result.records,
        overlay_png=base64.b64encode(result.overlay_png).decode() if result.overlay_png else None,
        timings_ms=timings.report(),
    )


def wants_png(request: Request) -> bool:
    """`Accept: image/png` (preferred over JSON, or alone) asks for the overlay picture."""
    accept = request.headers.get("accept", "")
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    return "image/png" in types and (
        "application/json" not in types
        or types.index("image/png") < types.index("application/json")
    )


@router.get("/healthz", summary="The proxy process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 only when Triton and both models are ready",
    responses={503: {"description": "Triton or a model is not ready; see Retry-After."}},
)
async def readyz(service: Service) -> JSONResponse:
    state = await service.gateway.readiness()
    if all(state.values()):
        return JSONResponse({"status": "ready", "triton": state})
    return problem_response(
        503,
        "not_ready",
        "Triton or a model is not ready",
        headers={"Retry-After": str(service.settings.triton_retry_after_s)},
        triton=state,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of the proxy",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics(registry: Annotated[ProxyMetrics, Depends(get_metrics)]) -> Response:
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
