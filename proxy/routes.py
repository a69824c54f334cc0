"""HTTP routes: request parsing and validation, then the pipeline in `proxy.service`."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.amg import AmgParams, AmgParamsError
from proxy.encodings import OutputFormat
from proxy.metrics import ProxyMetrics
from proxy.problems import ProblemError, problem_response
from proxy.prompts import Prompt, PromptError, parse_prompts
from proxy.schemas import EmbedResponse, EverythingResponse, SegmentResponse
from proxy.service import SegmentationService, Timings
from serving.settings import Settings

router = APIRouter()

IMAGE_ID_PATTERN = "^[0-9a-f]{64}$"  # the SHA-256 of the uploaded file, in hex
PROMPTS_EXAMPLE = '[{"points": [[320, 240]], "labels": [1]}, {"box": [10, 20, 200, 180]}]'
PROBLEM_RESPONSES = {
    404: {"description": "Unknown image_id (not cached): upload the file again."},
    413: {"description": "Upload over the byte limit."},
    415: {"description": "Not an image, or a format other than JPEG/PNG/WebP/BMP/TIFF."},
    422: {"description": "Invalid image (truncated, too many pixels) or prompts."},
    503: {"description": "Triton unavailable or overloaded; see Retry-After."},
    504: {"description": "Triton did not answer in time."},
}


def get_service(request: Request) -> SegmentationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ProxyMetrics:
    return request.app.state.metrics


Service = Annotated[SegmentationService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def read_upload(file: UploadFile | None, image_id: str | None, limit: int) -> bytes | None:
    """The uploaded bytes, or None when an image_id is given instead; exactly one is allowed."""
    if (file is None) == (image_id is None):
        raise ProblemError(
            422, "image_required", "send exactly one of `file` (an image) or `image_id`"
        )
    if file is None:
        return None
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ProblemError(
            413,
            "payload_too_large",
            f"file is over the limit of {limit} bytes",
            limit_bytes=limit,
        )
    return data


def parse_or_reject(raw: str, original_size: tuple[int, int], settings: Settings) -> list[Prompt]:
    height, width = original_size
    try:
        return parse_prompts(
            raw,
            width=width,
            height=height,
            max_prompts=settings.max_prompts,
            max_points=settings.max_points_per_prompt,
            coordinate_margin=settings.prompt_coordinate_margin * max(width, height),
        )
    except PromptError as exc:
        raise ProblemError(422, exc.code, str(exc)) from exc


@router.post(
    "/embed-image",
    response_model=EmbedResponse,
    responses=PROBLEM_RESPONSES,
    summary="Encode an image once and get its image_id for later prompts",
)
async def embed_image(
    service: Service,
    settings: AppSettings,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP or TIFF")],
) -> EmbedResponse:
    timings = Timings()
    data = await read_upload(file, None, settings.max_upload_bytes)
    image_id, entry, hit = await service.embed(data, None, timings)
    height, width = entry.original_size
    return EmbedResponse(
        image_id=image_id, width=width, height=height, cache_hit=hit, timings_ms=timings.report()
    )


def amg_params(
    points_per_side: Annotated[int | None, Form(description="Grid of n x n points (32).")] = None,
    points_per_batch: Annotated[
        int | None, Form(description="Prompts per decoder call (64).")
    ] = None,
    pred_iou_thresh: Annotated[float | None, Form(description="Keep masks above (0.88).")] = None,
    stability_score_thresh: Annotated[
        float | None, Form(description="Keep masks with stability at least (0.95).")
    ] = None,
    stability_score_offset: Annotated[float | None, Form(description="Logit offset (1.0).")] = None,
    box_nms_thresh: Annotated[
        float | None, Form(description="Box NMS IoU in a crop (0.7).")
    ] = None,
    crop_n_layers: Annotated[int | None, Form(description="Extra crop layers (0).")] = None,
    crop_nms_thresh: Annotated[
        float | None, Form(description="Box NMS IoU across crops (0.7).")
    ] = None,
    crop_overlap_ratio: Annotated[
        float | None, Form(description="Crop overlap (512/1500).")
    ] = None,
    crop_n_points_downscale_factor: Annotated[
        int | None, Form(description="Points per side shrink per layer (1).")
    ] = None,
    min_mask_region_area: Annotated[
        int | None, Form(description="Remove holes and islands below this area (0).")
    ] = None,
) -> AmgParams:
    """Segment-everything settings: upstream's names and defaults, overridable per request."""
    given = {name: value for name, value in locals().items() if value is not None}
    try:
        return AmgParams.from_mapping(given)
    except AmgParamsError as exc:
        raise ProblemError(422, "invalid_parameter", str(exc), field=exc.field) from exc


@router.post(
    "/segment-image",
    response_model=SegmentResponse | EverythingResponse,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "content": {"image/png": {}},
            "description": "JSON; or, with no prompts and `Accept: image/png`, the overlay.",
        },
    },
    summary="Segment objects given point and box prompts, or everything without prompts",
)
async def segment_image(
    request: Request,
    service: Service,
    settings: AppSettings,
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
                "box: [x0, y0, x1, y1]} in original-image pixels. Several items are several "
                "objects. Omit to segment everything."
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
    data = await read_upload(file, image_id, settings.max_upload_bytes)
    if prompts is None or not prompts.strip():
        return await segment_everything(
            request, service, data, image_id, params, output_format, return_overlay, timings
        )
    parsed: list[Prompt] = []

    def validate(original_size: tuple[int, int]) -> None:
        parsed[:] = parse_or_reject(prompts, original_size, settings)

    image_id, entry, hit = await service.embed(data, image_id, timings, validate)
    if not parsed:  # a cache hit: nothing was decoded, so validate against the cached size
        validate(entry.original_size)
    height, width = entry.original_size
    results = await service.segment(entry, parsed, multimask_output, output_format, timings)
    return SegmentResponse(
        image_id=image_id,
        width=width,
        height=height,
        cache_hit=hit,
        results=[{"masks": records} for records in results],
        timings_ms=timings.report(),
    )


async def segment_everything(
    request: Request,
    service: SegmentationService,
    data: bytes | None,
    image_id: str | None,
    params: AmgParams,
    output_format: OutputFormat,
    return_overlay: bool,
    timings: Timings,
) -> EverythingResponse | Response:
    png_only = wants_png(request)
    image_id, entry, hit = await service.embed(data, image_id, timings)
    records, overlay_png = await service.segment_everything(
        image_id, entry, params, output_format, return_overlay or png_only, timings
    )
    if png_only:
        return Response(
            overlay_png,
            media_type="image/png",
            headers={"X-Object-Count": str(len(records)), "X-Image-Id": image_id},
        )
    height, width = entry.original_size
    return EverythingResponse(
        image_id=image_id,
        width=width,
        height=height,
        cache_hit=hit,
        count=len(records),
        masks=records,
        overlay_png=base64.b64encode(overlay_png).decode() if overlay_png else None,
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
    responses={503: {"description": "Triton or a model is not ready."}},
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


@router.get("/metrics", summary="Prometheus metrics of the proxy")
async def metrics(registry: Annotated[ProxyMetrics, Depends(get_metrics)]) -> Response:
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
