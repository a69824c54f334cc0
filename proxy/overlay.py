"""A picture of the result: each mask in its own colour over the image, with the count."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from proxy.postprocess import batched_mask_to_box

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

    `masks` may be a lazy sequence that decodes on access: each mask is fetched once, and only
    its bounding box is worked on, in uint8, so memory stays near one copy of the image.
    """
    picture = image.copy()
    colours = mask_colours(len(masks))
    if areas is None:
        areas = [int(np.count_nonzero(masks[i])) for i in range(len(masks))]
    order = sorted(range(len(masks)), key=lambda i: -areas[i])
    outlines = []
    for index in order:
        mask = masks[index]
        x0, y0, x1, y1 = (int(v) for v in batched_mask_to_box(mask))  # 0s when empty
        window = picture[y0 : y1 + 1, x0 : x1 + 1]
        inside = mask[y0 : y1 + 1, x0 : x1 + 1]
        if not inside.any():
            continue
        for channel in range(3):
            blended = cv2.convertScaleAbs(
                window[..., channel],
                alpha=1 - OPACITY,
                beta=float(colours[index, channel]) * OPACITY,
            )
            np.copyto(window[..., channel], blended, where=inside)
        contours, _ = cv2.findContours(
            inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0)
        )
        outlines.append((contours, tuple(int(c) for c in colours[index])))
    for contours, colour in outlines:  # after every blend, as the outlines sit on top
        cv2.drawContours(picture, contours, -1, colour, 1)
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
