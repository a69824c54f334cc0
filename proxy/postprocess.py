"""Decoder logits -> masks, scores and boxes: upstream's torch post-processing in numpy/OpenCV.

`cv2.resize(..., INTER_LINEAR)` samples at ``(dst + 0.5) * scale - 0.5`` with edge clamping and
no antialiasing, which is `F.interpolate(mode="bilinear", align_corners=False)`. It works in
float32 like torch; the results differ from torch only by float rounding (about 1e-5).

These run for hundreds of masks in 'segment everything', so they stay in float32, work on
views where they can, and upsample only the part of the 256x256 logits that survives the crop.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from common.contract import DEFAULT_IMAGE_SIDE
from proxy.geometry import Size

MASK_THRESHOLD = 0.0  # upstream `Sam.mask_threshold`
STABILITY_SCORE_OFFSET = 1.0  # upstream `SamAutomaticMaskGenerator` default


def select_masks(
    low_res_masks: np.ndarray, iou_predictions: np.ndarray, multimask_output: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Upstream `MaskDecoder.forward`'s slice: tokens 1..3 when multimask, else token 0.

    low_res_masks [P, 4, 256, 256], iou_predictions [P, 4] -> views [P, 3|1, ...], [P, 3|1].
    """
    tokens = slice(1, None) if multimask_output else slice(0, 1)
    return low_res_masks[:, tokens], iou_predictions[:, tokens]


def postprocess_masks(
    masks: np.ndarray, input_size: Size, original_size: Size, image_side: int = DEFAULT_IMAGE_SIDE
) -> np.ndarray:
    """Upstream `Sam.postprocess_masks`: [..., 256, 256] logits -> [..., H, W] float32 logits.

    Upsample to image_side x image_side, crop the padding away (input_size is the resized
    image's (h, w)), resize to original_size (h, w), all bilinear with align_corners=False.
    """
    low_h, low_w = masks.shape[-2:]
    out_h, out_w = original_size
    flat = masks.reshape(-1, low_h, low_w)
    out = np.empty((flat.shape[0], out_h, out_w), dtype=np.float32)
    for index, mask in enumerate(flat):
        postprocess_mask(mask, input_size, original_size, image_side, out=out[index])
    return out.reshape(*masks.shape[:-2], out_h, out_w)


def postprocess_mask(
    mask: np.ndarray,
    input_size: Size,
    original_size: Size,
    image_side: int = DEFAULT_IMAGE_SIDE,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`postprocess_masks` for one [256, 256] mask, optionally into a reused float32 buffer.

    Full-resolution float logits are 4 bytes per pixel (48 MB for a 12 MP photo), so callers
    handling many masks can stream them through one buffer instead of holding them all.
    """
    out_h, out_w = original_size
    if out is None:
        out = np.empty((out_h, out_w), dtype=np.float32)
    cropped = _upsample_cropped(mask, input_size, image_side)
    cv2.resize(cropped, (out_w, out_h), dst=out, interpolation=cv2.INTER_LINEAR)
    return out


def _upsample_cropped(mask: np.ndarray, input_size: Size, image_side: int) -> np.ndarray:
    """`interpolate(mask, image_side)[:h, :w]` without computing the rows and columns dropped.

    With an integer factor f, output pixel i reads source pixels floor((i + 0.5) / f - 0.5)
    and one more, so the first ceil(n / f) + 1 source rows give the first n output rows
    exactly (same scale, same weights; the clamped border lies beyond the crop).
    """
    mask = mask.astype(np.float32, copy=False)
    low_h, low_w = mask.shape
    in_h, in_w = input_size
    factor_h, factor_w = image_side // low_h, image_side // low_w
    if factor_h * low_h != image_side or factor_w * low_w != image_side:
        full = cv2.resize(mask, (image_side, image_side), interpolation=cv2.INTER_LINEAR)
        return full[:in_h, :in_w]
    rows = min(low_h, math.ceil(in_h / factor_h) + 1)
    cols = min(low_w, math.ceil(in_w / factor_w) + 1)
    upsampled = cv2.resize(
        mask[:rows, :cols], (cols * factor_w, rows * factor_h), interpolation=cv2.INTER_LINEAR
    )
    return upsampled[:in_h, :in_w]


def threshold_masks(logits: np.ndarray, mask_threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Binary masks as upstream: strictly greater than the threshold."""
    return logits > mask_threshold


def stability_score(
    logits: np.ndarray,
    threshold: float = MASK_THRESHOLD,
    offset: float = STABILITY_SCORE_OFFSET,
) -> np.ndarray:
    """Upstream `calculate_stability_score`: IoU of the masks at threshold +- offset.

    [..., H, W] -> [...] float32, divided in float32 like torch. An empty union gives NaN as
    upstream (every comparison with it is False, so a threshold filter drops it).
    """
    intersections = _count_above(logits, threshold + offset)
    unions = _count_above(logits, threshold - offset)
    with np.errstate(invalid="ignore", divide="ignore"):
        return intersections / unions


def _count_above(logits: np.ndarray, value: float) -> np.ndarray:
    """Per-mask count of logits > value, as float32 (torch's int / int gives float32)."""
    flat = logits.reshape(-1, *logits.shape[-2:])
    # A whole-array count_nonzero is about 3x faster than one with axis=(-2, -1).
    counts = np.array([np.count_nonzero(mask > value) for mask in flat], dtype=np.float32)
    return counts.reshape(logits.shape[:-2])


def mask_area(masks: np.ndarray) -> np.ndarray:
    """Pixel count of each [..., H, W] boolean mask."""
    return np.count_nonzero(masks, axis=(-2, -1))


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Upstream `batched_mask_to_box`: [..., H, W] bool -> [..., 4] int64 XYXY.

    x1 and y1 are the last covered column and row (inclusive); an empty mask gives [0, 0, 0, 0].
    """
    height, width = masks.shape[-2:]
    if masks.size == 0:
        return np.zeros((*masks.shape[:-2], 4), dtype=np.int64)
    rows = masks.any(axis=-1)  # [..., H]
    cols = masks.any(axis=-2)  # [..., W]
    top = rows.argmax(axis=-1)
    bottom = height - 1 - rows[..., ::-1].argmax(axis=-1)
    left = cols.argmax(axis=-1)
    right = width - 1 - cols[..., ::-1].argmax(axis=-1)
    boxes = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
    boxes[~rows.any(axis=-1)] = 0
    return boxes


def box_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Upstream `box_xyxy_to_xywh` over the last axis: w = x1 - x0, h = y1 - y0 (no +1)."""
    xywh = boxes.copy()
    xywh[..., 2] = boxes[..., 2] - boxes[..., 0]
    xywh[..., 3] = boxes[..., 3] - boxes[..., 1]
    return xywh
