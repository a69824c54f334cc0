"""A picture of the result: each mask in its own colour over the image, with the count."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

OPACITY = 0.5
GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def mask_colours(count: int) -> np.ndarray:
    """Distinct, deterministic RGB colours: hues spaced by the golden ratio."""
    if count == 0:
        return np.empty((0, 3), dtype=np.uint8)
    hues = (np.arange(count) * GOLDEN_RATIO_CONJUGATE) % 1.0
    hsv = np.stack([hues * 179, np.full(count, 200), np.full(count, 255)], axis=-1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def render_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    label: str,
    areas: Sequence[int] | None = None,
) -> np.ndarray:
    """RGB uint8 image with masks blended in (largest first, so small ones stay visible),
    their outlines, and `label` in the top-left corner.

    `masks` may be a lazy sequence that decodes on access: each mask is fetched on its own
    (twice), so hundreds of full-resolution masks never sit in memory together.
    """
    canvas = image.astype(np.float32)
    colours = mask_colours(len(masks))
    if areas is None:
        areas = [int(np.count_nonzero(masks[i])) for i in range(len(masks))]
    order = sorted(range(len(masks)), key=lambda i: -areas[i])
    for index in order:
        mask = masks[index]
        canvas[mask] = canvas[mask] * (1 - OPACITY) + colours[index] * OPACITY
    picture = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    for index in order:
        contours, _ = cv2.findContours(
            masks[index].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(picture, contours, -1, tuple(int(c) for c in colours[index]), 1)
    _draw_label(picture, label)
    return picture


def _draw_label(picture: np.ndarray, label: str) -> None:
    scale = max(0.4, min(picture.shape[:2]) / 600)
    thickness = max(1, round(scale * 2))
    (width, height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(4 * scale))
    cv2.rectangle(picture, (0, 0), (width + 2 * pad, height + baseline + 2 * pad), (0, 0, 0), -1)
    cv2.putText(
        picture,
        label,
        (pad, pad + height),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        thickness,
        cv2.LINE_AA,
    )


def overlay_png(image: np.ndarray, masks: Sequence[np.ndarray], areas: Sequence[int]) -> bytes:
    """The PNG of `render_overlay`, labelled with the object count."""
    count = len(masks)
    label = f"{count} object" + ("" if count == 1 else "s")
    return encode_png(render_overlay(image, masks, label, areas))


def encode_png(picture: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()
