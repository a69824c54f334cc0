"""Upstream's helpers for segment-everything (`mobile_sam.utils.amg`, `torchvision.ops`) in
numpy, each checked against its original in tests/test_everything_steps.py.

Comparisons with thresholds happen in float32, like torch's tensor-vs-Python-scalar comparisons
(`stability >= 0.95` compares with float32(0.95)); NMS IoUs are float32 and compared with the
threshold in float64, like torchvision's C++ kernel. `batched_nms` keeps exactly torchvision's
set of boxes, ordered by decreasing score with ties in input order (torchvision's stable sort).
Above 1000 boxes torchvision re-sorts the kept indices with torch's *unstable* sort, so equal
scores may come out in another order there; the kept set is the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import product
from typing import Any

import cv2
import numpy as np

from proxy.geometry import Size


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Upstream `build_point_grid`: [n*n, 2] (x, y) points evenly spaced in [0, 1]^2."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """Upstream `build_all_layer_point_grids`: one normalised grid per crop layer."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Size, n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Upstream `generate_crop_boxes`: XYXY crop boxes (the whole image first) and layers."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops)

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Iterator[list[Any]]:
    """Upstream `batch_iterator`: consecutive slices of batch_size of each argument."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("Batched iteration must have inputs of all the same size.")
    n_batches = len(args[0]) // batch_size + int(len(args[0]) % batch_size != 0)
    for b in range(n_batches):
        yield [arg[b * batch_size : (b + 1) * batch_size] for arg in args]


def box_area(boxes: np.ndarray) -> np.ndarray:
    """torchvision `box_area` for XYXY boxes [..., 4], in the boxes' dtype."""
    boxes = np.asarray(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """Upstream `uncrop_boxes_xyxy`: crop-frame XYXY boxes [..., 4] -> image frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + np.array([x0, y0, x0, y0], dtype=boxes.dtype)


def uncrop_points(points: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """Upstream `uncrop_points`: crop-frame (x, y) points [..., 2] -> image frame."""
    return points + np.array([crop_box[0], crop_box[1]], dtype=points.dtype)


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> np.ndarray:
    """Upstream `is_box_near_crop_edge`: crop-frame boxes [N, 4] -> [N] bool.

    True where a side lies within atol of the crop's side without being within atol of the
    image's (a mask cut by the crop, not by the picture). float32 like upstream.
    """
    crop = np.asarray(crop_box, dtype=np.float32)
    orig = np.asarray(orig_box, dtype=np.float32)
    boxes = uncrop_boxes_xyxy(np.asarray(boxes), crop_box).astype(np.float32)
    tolerance = np.float32(atol)
    near_crop_edge = np.abs(boxes - crop[None, :]) <= tolerance
    near_image_edge = np.abs(boxes - orig[None, :]) <= tolerance
    return np.any(near_crop_edge & ~near_image_edge, axis=1)


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """torch's stable descending sort: NaN first (torch ranks NaN above everything), ties in
    input order."""
    scores = np.asarray(scores)
    return np.lexsort((-scores, ~np.isnan(scores)))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision `nms` (its CPU kernel): kept indices by decreasing score.

    Boxes are visited in a stable descending sort of the scores; a box is dropped when its IoU
    with a kept box is above iou_threshold. Areas and IoUs are computed in the boxes' float
    type with the kernel's operation order, and compared with the threshold in float64.
    """
    boxes = np.asarray(boxes)
    if boxes.dtype not in (np.float32, np.float64):
        boxes = boxes.astype(np.float32)
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    order = _descending_order(scores)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    zero = boxes.dtype.type(0)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(len(order)):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = slice(i + 1, None)
            width = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            height = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = width * height
            overlap = inter / (areas[i] + areas[rest] - inter)
            suppressed[rest] |= overlap.astype(np.float64) > iou_threshold
    return order[np.asarray(keep, dtype=np.int64)].astype(np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """torchvision `batched_nms`: NMS within each category, kept indices by decreasing score.

    The kept set is torchvision's. The order is its stable one (ties in input order); above
    1000 boxes torchvision orders ties with torch's unstable sort instead (module docstring).
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    idxs = np.asarray(idxs)
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    categories = np.unique(idxs)
    if len(categories) == 1:
        return nms(boxes, scores, iou_threshold)
    keep_mask = np.zeros(len(boxes), dtype=bool)
    for category in categories:
        members = np.flatnonzero(idxs == category)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = np.flatnonzero(keep_mask)
    return kept[_descending_order(scores[kept])].astype(np.int64)


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Upstream `remove_small_regions`: fill holes ("holes") or drop islands ("islands")
    smaller than area_thresh (8-connected). Returns the mask and whether it changed.

    When every island is small, the largest is kept (the first in OpenCV's label order).
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working_mask, 8)
    sizes = stats[:, -1][1:]  # row 0 is the background label
    small_regions = np.flatnonzero(sizes < area_thresh) + 1
    if len(small_regions) == 0:
        return mask, False
    fill = np.zeros(n_labels, dtype=bool)
    if correct_holes:
        fill[0] = True
        fill[small_regions] = True
    else:
        fill[1:] = True
        fill[small_regions] = False
        if not fill.any():  # every region is below the threshold: keep the largest
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[regions], True
