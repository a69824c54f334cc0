"""Response models: upstream's record names (`segmentation`, `area`, `bbox`, `predicted_iou`,
`stability_score`), with examples for the OpenAPI docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CocoRle(BaseModel):
    size: list[int] = Field(description="[height, width]", examples=[[480, 640]])
    counts: str = Field(description="COCO compressed RLE (column-major), as pycocotools writes")


class MaskRecord(BaseModel):
    segmentation: CocoRle | str | list[list[float]] = Field(
        description="COCO RLE (`rle`), base64 PNG (`png`) or polygons [[x0, y0, x1, y1, ...]]"
    )
    predicted_iou: float = Field(description="The decoder's own estimate of mask quality.")
    stability_score: float = Field(
        description="IoU of the mask thresholded at logit +1 and -1 (upstream's definition)."
    )
    area: int = Field(description="Pixels in the mask.")
    bbox: list[int] = Field(description="[x, y, width, height] in image pixels.")


class PromptMaskRecord(MaskRecord):
    mask_id: str = Field(
        description=(
            "Send it back in a prompt item to refine this object with this mask, as "
            "SamPredictor.predict(mask_input=...) does; kept for a while (LRU)."
        ),
        examples=["9c0e5d1f3a7b4c2e8f6a0b1c2d3e4f50"],
    )


class PromptResult(BaseModel):
    masks: list[PromptMaskRecord] = Field(description="Ranked by predicted IoU, best first.")


class ImageInfo(BaseModel):
    image_id: str = Field(
        description="Send it instead of the file to re-prompt without re-encoding.",
        examples=["3b1f0c5e9d..."],
    )
    width: int
    height: int
    cache_hit: bool = Field(description="True when the encoder did not run for this request.")
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage.",
        examples=[
            {
                "decode_image": 4.1,
                "preprocess": 6.3,
                "encoder": 480.2,
                "decoder": 61.0,
                "postprocess": 9.8,
                "total": 563.0,
            }
        ],
    )


class EmbedResponse(ImageInfo):
    pass


class SegmentResponse(ImageInfo):
    results: list[PromptResult] = Field(description="One entry per prompt, in request order.")


class EverythingMaskRecord(MaskRecord):
    point_coords: list[list[float]] = Field(
        description="The grid point that produced the mask, in image pixels."
    )
    crop_box: list[int] = Field(description="[x, y, width, height] of the crop it came from.")


class EverythingResponse(ImageInfo):
    count: int = Field(description="Number of objects found.")
    masks: list[EverythingMaskRecord] = Field(
        description="Upstream SamAutomaticMaskGenerator's records, in its order."
    )
    overlay_png: str | None = Field(
        default=None,
        description="With return_overlay=true: base64 PNG of the masks over the image.",
    )


class Problem(BaseModel):
    """RFC 9457 problem details; every error the API returns. Errors may add fields (the
    offending `field`, a `limit`, the `triton` readiness map, ...)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["/problems/invalid_box"])
    title: str = Field(examples=["Unprocessable Content"])
    status: int = Field(examples=[422])
    code: str = Field(description="Stable and machine-readable.", examples=["invalid_box"])
    detail: str = Field(
        description="For people: what is wrong and where.",
        examples=["prompts[0].box: corners must be top-left then bottom-right"],
    )
