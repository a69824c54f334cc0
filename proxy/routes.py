"""HTTP routes: request parsing and validation, then the pipeline in `proxy.service`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.encodings import OutputFormat
from proxy.metrics import ProxyMetrics
from proxy.problems import ProblemError, problem_response
from proxy.prompts import Prompt, PromptError, parse_prompts
from proxy.schemas import EmbedResponse, SegmentResponse
from proxy.service import SegmentationService, Timings
from serving.settings import Settings

router = APIRouter()

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


@router.post(
    "/segment-image",
    response_model=SegmentResponse,
    responses=PROBLEM_RESPONSES,
    summary="Segment objects given point and box prompts",
)
async def segment_image(
    service: Service,
    settings: AppSettings,
    file: Annotated[UploadFile | None, File(description="JPEG, PNG, WebP, BMP or TIFF")] = None,
    image_id: Annotated[
        str | None, Form(description="From an earlier response or POST /embed-image.")
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
) -> SegmentResponse:
    timings = Timings()
    data = await read_upload(file, image_id, settings.max_upload_bytes)
    if prompts is None or not prompts.strip():
        raise ProblemError(
            422,
            "prompts_required",
            "segment-everything (no prompts) is not available yet; send `prompts`",
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
