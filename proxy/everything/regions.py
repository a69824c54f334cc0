"""Upstream `postprocess_small_regions` on masks stored as RLE, a window at a time.

Upstream decodes every mask to the whole image; here each mask is cleaned on a window around
it, correcting the size of the background regions that continue outside the window; the few
cases a window cannot decide exactly fall back to the whole image. The results are upstream's.
"""

from __future__ import annotations

import cv2
import numpy as np

from proxy import postprocess
from proxy.encodings import rle_box, rle_counts, rle_window
from proxy.everything.masks import MaskData
from proxy.everything.upstream import batched_nms, remove_small_regions
from proxy.geometry import Size


def postprocess_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
    """Upstream `SamAutomaticMaskGenerator.postprocess_small_regions`.

    Fills holes and removes islands smaller than min_area in every mask, then box NMS where
    unchanged masks score 1 and changed ones 0, and the kept changed masks get their new RLE
    and box. Returns a new MaskData in the NMS order (upstream filters in place).
    """
    if len(data) == 0:
        return data
    new_boxes = np.empty((len(data), 4), dtype=np.int64)
    scores = np.empty(len(data), dtype=np.float32)
    changed_rles: dict[int, np.ndarray] = {}
    for index, counts in enumerate(data.rles):
        result = _clean_small_regions(counts, data.size, min_area)
        if result is None:
            new_boxes[index] = rle_box(counts, data.size)
            scores[index] = 1.0
        else:
            changed_rles[index], new_boxes[index] = result
            scores[index] = 0.0
    keep = batched_nms(
        new_boxes.astype(np.float32), scores, np.zeros(len(data), dtype=np.int64), nms_thresh
    )
    rles = list(data.rles)
    boxes = data.boxes.copy()
    for index in keep:
        if index in changed_rles:
            rles[index] = changed_rles[index]
            boxes[index] = new_boxes[index]
    updated = MaskData(
        data.size, rles, boxes, data.iou_preds, data.points, data.stability_score, data.crop_boxes
    )
    return updated.take(keep)


def _clean_small_regions(
    counts: np.ndarray, size: Size, min_area: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Holes then islands on one RLE mask: None if unchanged, else (new counts, new box)."""
    height, width = size
    box = rle_box(counts, size)
    if len(counts) < 2:  # empty mask: whatever happens concerns the whole image
        return _clean_whole_image(counts, size, min_area)
    bx0, by0, bx1, by1 = (int(v) for v in box)
    wx0, wy0 = max(bx0 - 1, 0), max(by0 - 1, 0)
    wx1, wy1 = min(bx1 + 2, width), min(by1 + 2, height)
    window = np.ascontiguousarray(rle_window(counts, size, (wx0, wy0, wx1, wy1)))

    # Holes: components of the background. Beyond the window everything is background. Split
    # it into four disjoint bands (above and below: full width; left and right: the window's
    # rows). Each band is connected and touches the window's one-pixel margin on its side, a
    # background line within one component: add the band's pixels to that component. Bands
    # joined outside the window (above and left, say) also meet in the margin's corner, so
    # the labels already join them.
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats((~window).astype(np.uint8), 8)
    sizes = stats[1:, -1].astype(np.int64)
    bands = (
        (wy0 > 0, regions[0, 0], wy0 * width),
        (wy1 < height, regions[-1, 0], (height - wy1) * width),
        (wx0 > 0, regions[0, 0], (wy1 - wy0) * wx0),
        (wx1 < width, regions[0, -1], (wy1 - wy0) * (width - wx1)),
    )
    margin_labels = []
    for present, label, area in bands:
        if present:
            sizes[label - 1] += area
            margin_labels.append(label)
    if any(sizes[label - 1] < min_area for label in margin_labels):
        return _clean_whole_image(counts, size, min_area)  # pixels beyond would be filled
    small = np.flatnonzero(sizes < min_area) + 1
    changed = len(small) > 0
    if changed:
        fill = np.zeros(n_labels, dtype=bool)
        fill[0] = True
        fill[small] = True
        window = fill[regions]

    # Islands: all inside the window, so their sizes are exact.
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(window.astype(np.uint8), 8)
    sizes = stats[1:, -1]
    small = np.flatnonzero(sizes < min_area) + 1
    if len(small):
        fill = np.ones(n_labels, dtype=bool)
        fill[0] = False
        fill[small] = False
        if not fill.any():
            largest = np.flatnonzero(sizes == sizes.max())
            if len(largest) > 1:  # which one upstream keeps depends on its label order
                return _clean_whole_image(counts, size, min_area)
            fill[largest[0] + 1] = True
        window = fill[regions]
        changed = True
    if not changed:
        return None
    local_box = postprocess.batched_mask_to_box(window)
    new_box = local_box + np.array([wx0, wy0, wx0, wy0]) if window.any() else local_box
    return rle_counts(window, size, (wx0, wy0), local_box), new_box


def _clean_whole_image(
    counts: np.ndarray, size: Size, min_area: int
) -> tuple[np.ndarray, np.ndarray] | None:
    height, width = size
    mask = np.ascontiguousarray(rle_window(counts, size, (0, 0, width, height)))
    mask, holes_changed = remove_small_regions(mask, min_area, mode="holes")
    mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
    if not (holes_changed or islands_changed):
        return None
    box = postprocess.batched_mask_to_box(mask)
    return rle_counts(mask, size, (0, 0), box), box
