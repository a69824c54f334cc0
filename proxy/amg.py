"""Segment everything: upstream `SamAutomaticMaskGenerator` without torch, as pure steps.

The generator prompts the decoder with a grid of single points, on the whole image and
optionally on overlapping crops, and keeps the masks that survive a chain of filters. Here
that chain is split into I/O-free steps that the service calls between its Triton calls::

    size = image.shape[:2]; side = 1024                      # the encoder's input side
    jobs = crop_plan(size, params, side)                     # crops, each with its grid points
    for job in jobs:                                         # (crops may be encoded together)
        embedding = encode(resize + pad of job.crop(image))  # Triton encoder
        batches = []
        for points in job.batches(params.points_per_batch):
            coords, labels = decoder_inputs(points, job.size, side)
            low_res, iou = decode(embedding, coords, labels)   # Triton decoder, [P, 4, ...]
            batches.append(process_batch(low_res, iou, points, job.box, size, params, ...))
        crops.append(finish_crop(batches, job.box, params))
    data = merge_crops(crops, params)
    if params.min_mask_region_area > 0:
        data = postprocess_small_regions(data, params.min_mask_region_area,
                                         max(params.box_nms_thresh, params.crop_nms_thresh))
    records = to_records(data, output_format)

`generate_masks` is that loop with callbacks, for synchronous callers and the tests.

Upstream semantics kept on purpose, all checked against upstream in tests/test_proxy_amg.py:

* Comparisons with thresholds happen in float32, like torch's tensor-vs-Python-scalar
  comparisons (`stability >= 0.95` compares with float32(0.95)); NMS IoUs are float32 and
  compared with the threshold in float64, like torchvision's C++ kernel.
* `batched_nms` keeps exactly torchvision's set of boxes, ordered by decreasing score with
  ties in input order (torchvision's stable sort). Above 1000 boxes torchvision re-sorts the
  kept indices with torch's *unstable* sort, so equal scores may come out in another order
  there; the kept set is the same.
* Masks are stored as uncompressed COCO RLE counts in the original image frame (upstream's
  `rles`), built straight from the crop-frame mask and its offset: no whole-image boolean or
  float mask is ever held for more than one mask at a time.

Where this differs from upstream, for speed and memory, with the same results (up to the
float rounding of the upsampling, `proxy.postprocess`: about 1e-5 on logits):

* The predicted-IoU filter runs before upsampling (upstream upsamples all P x 3 masks of a
  batch to the crop size first); the filter does not depend on the masks.
* Masks are upsampled one at a time into one reused float32 buffer (`Workspace`), and the
  thresholds, counts, box and RLE only read the window where the logits can exceed the
  lowest threshold (`logit_reach`, a conservative bound from the low-res logits).
* `postprocess_small_regions` works on a window around each mask instead of the whole
  image, correcting the size of the background regions that continue outside the window;
  the few cases a window cannot decide exactly fall back to the whole image.

Upstream bugs not reproduced: with crops, a crop that yields no mask makes upstream fail in
`box_area` (an empty `torch.tensor([])` has no box axis); here it simply contributes nothing.
Crops too thin to be resized for the encoder (upstream fails in `set_image`) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import product
from typing import Any, ClassVar

import cv2
import numpy as np

from . import encodings, postprocess
from .encodings import OutputFormat
from .geometry import Size, apply_coords, preprocess_shape

Box = tuple[int, int, int, int]  # XYXY, x1 and y1 exclusive for crop boxes

FOREGROUND_LABEL, PADDING_LABEL = 1.0, -1.0
EDGE_TOLERANCE = 20.0  # upstream `is_box_near_crop_edge` atol, in pixels


# --- parameters ----------------------------------------------------------------------------


class AmgParamsError(ValueError):
    """A parameter outside its documented range; `field` names it for a 422 response."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class AmgParams:
    """Upstream `SamAutomaticMaskGenerator` settings, same names and defaults.

    Accepted ranges (`LIMITS`, inclusive), checked on construction:

    ===============================  ===========  ===============================================
    points_per_side                  1 .. 64      grid of n x n points on the first crop layer
    points_per_batch                 1 .. 256     prompts per decoder call
    pred_iou_thresh                  -1 .. 1      <= 0 disables the filter (upstream's ``> 0``)
    stability_score_thresh           0 .. 1       0 disables the filter
    stability_score_offset           0 .. 16      logit offset of the stability score
    box_nms_thresh                   0 .. 1       IoU above which a box is a duplicate in a crop
    crop_n_layers                    0 .. 3       layer i adds (2**i)**2 crops (3 layers: 85)
    crop_nms_thresh                  0 .. 1       duplicate IoU between crops
    crop_overlap_ratio               0 .. 0.9     overlap of first-layer crops, of the short side
    crop_n_points_downscale_factor   1 .. 16      layer i has points_per_side / factor**i points
    min_mask_region_area             0 .. 10**7   pixels; 0 disables the clean-up
    ===============================  ===========  ===============================================

    Every crop layer must keep at least one point per side:
    ``points_per_side // crop_n_points_downscale_factor**crop_n_layers >= 1``
    (upstream would divide by zero). Upstream's alternative `point_grids` is not offered.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "points_per_side": (1, 64),
        "points_per_batch": (1, 256),
        "pred_iou_thresh": (-1.0, 1.0),
        "stability_score_thresh": (0.0, 1.0),
        "stability_score_offset": (0.0, 16.0),
        "box_nms_thresh": (0.0, 1.0),
        "crop_n_layers": (0, 3),
        "crop_nms_thresh": (0.0, 1.0),
        "crop_overlap_ratio": (0.0, 0.9),
        "crop_n_points_downscale_factor": (1, 16),
        "min_mask_region_area": (0, 10_000_000),
    }

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            low, high = self.LIMITS[field.name]
            if field.type == "int":
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise AmgParamsError(field.name, f"must be an integer, got {value!r}")
                object.__setattr__(self, field.name, int(value))
            else:
                if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                    raise AmgParamsError(field.name, f"must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise AmgParamsError(field.name, f"must be a finite number, got {value!r}")
                object.__setattr__(self, field.name, float(value))
            if not low <= value <= high:
                raise AmgParamsError(
                    field.name, f"{value!r} is outside the allowed range {low} to {high}"
                )
        last_layer = self.crop_n_points_downscale_factor**self.crop_n_layers
        if int(self.points_per_side / last_layer) < 1:
            raise AmgParamsError(
                "crop_n_points_downscale_factor",
                f"{self.points_per_side} points per side divided by "
                f"{self.crop_n_points_downscale_factor}**{self.crop_n_layers} leaves no point "
                "on the last crop layer",
            )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AmgParams:
        """Build from a JSON object; unknown names are an error (a typo must not pass)."""
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise AmgParamsError(
                unknown[0],
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(names))}",
            )
        return cls(**raw)


# --- upstream helpers (utils/amg.py, torchvision.ops) in numpy ------------------------------


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


def uncrop_masks(
    masks: np.ndarray, crop_box: Sequence[int], orig_h: int, orig_w: int
) -> np.ndarray:
    """Upstream `uncrop_masks`: zero-pad [..., h, w] crop masks to [..., orig_h, orig_w]."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, pad_y - y0), (x0, pad_x - x0)]
    return np.pad(masks, pad)


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


# --- uncompressed RLE in the original frame -------------------------------------------------


def _counts_dtype(size: Size) -> type[np.integer]:
    return np.int32 if size[0] * size[1] < 2**31 else np.int64


def mask_to_rle_counts(
    mask: np.ndarray,
    size: Size | None = None,
    offset: tuple[int, int] = (0, 0),
    box: Sequence[int] | None = None,
) -> np.ndarray:
    """Uncompressed COCO RLE counts of `mask` placed at offset (x, y) in a zero size (h, w).

    Column-major runs, zeros first (0 when the first pixel is set), as upstream's
    `mask_to_rle_pytorch(uncrop_masks(mask))` but without building the padded mask: only the
    mask's bounding box is read. `box` (XYXY inclusive, `batched_mask_to_box`) saves finding it.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape if size is None else size
    dtype = _counts_dtype((height, width))
    if box is None:
        box = postprocess.batched_mask_to_box(mask)
    bx0, by0, bx1, by1 = (int(v) for v in box)
    sub = mask[by0 : by1 + 1, bx0 : bx1 + 1]
    if not sub.any():
        return np.array([height * width], dtype=dtype)
    sub_h, sub_w = sub.shape
    # Columns of the box, each followed by one unset pixel, so no run crosses a column here.
    columns = np.zeros((sub_w, sub_h + 1), dtype=np.uint8)
    target = columns[:, :sub_h]
    transposed = cv2.transpose(sub.view(np.uint8), dst=target)  # ~4x numpy's `sub.T` copy
    if not np.shares_memory(transposed, columns):
        target[...] = transposed
    flat = columns.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate(([0], changes))
    starts, ends = changes[0::2], changes[1::2]  # every run ends, at the latest on its pad
    x0, y0 = offset[0] + bx0, offset[1] + by0
    column_stride = sub_h + 1

    def to_frame(index: np.ndarray) -> np.ndarray:
        col, row = np.divmod(index, column_stride)
        return (x0 + col).astype(np.int64) * height + y0 + row

    starts, ends = to_frame(starts), to_frame(ends)
    # A run reaching the bottom of a column continues into the next column's top run.
    joined = ends[:-1] == starts[1:]
    if joined.any():
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    edges = np.empty(2 * len(starts) + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1:2] = starts
    edges[2:-1:2] = ends
    edges[-1] = height * width
    counts = np.diff(edges)
    if counts[-1] == 0:  # the last run reaches the end: upstream has no trailing zero count
        counts = counts[:-1]
    return counts.astype(dtype)


def rle_counts_window(counts: np.ndarray, size: Size, window: Sequence[int]) -> np.ndarray:
    """The [y0:y1, x0:x1] part (window XYXY, exclusive) of an RLE mask, as HxW bool.

    Reads only the columns x0..x1 of the column-major runs; the whole mask is
    `rle_counts_window(counts, size, (0, 0, w, h))`.
    """
    height, _ = size
    x0, y0, x1, y1 = window
    edges = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    lo, hi = x0 * height, x1 * height
    lengths = np.diff(np.clip(edges, lo, hi))
    values = np.arange(len(counts)) % 2 == 1
    band = np.repeat(values, lengths)
    return band.reshape(x1 - x0, height).T[y0:y1]


def rle_counts_box(counts: np.ndarray, size: Size) -> np.ndarray:
    """`batched_mask_to_box` of an RLE mask without decoding it: XYXY inclusive int64."""
    height, _ = size
    edges = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    starts, ends = edges[1:-1:2], edges[2::2]
    if len(ends) < len(starts):  # defensive: a final run without its end
        ends = np.append(ends, edges[-1])
    keep = ends > starts
    starts, ends = starts[keep], ends[keep] - 1
    if len(starts) == 0:
        return np.zeros(4, dtype=np.int64)
    start_col, start_row = np.divmod(starts, height)
    end_col, end_row = np.divmod(ends, height)
    spans = end_col > start_col  # such a run covers the column's bottom and the next's top
    top = np.where(spans, 0, start_row).min()
    bottom = np.where(spans, height - 1, end_row).max()
    return np.array([start_col.min(), top, end_col.max(), bottom], dtype=np.int64)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Upstream `mask_to_rle_pytorch` for one HxW mask: {"size": [h, w], "counts": [...]}."""
    height, width = mask.shape
    return {"size": [height, width], "counts": mask_to_rle_counts(mask).tolist()}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Upstream `rle_to_mask`: an uncompressed RLE dict -> HxW bool (C order)."""
    height, width = rle["size"]
    window = rle_counts_window(np.asarray(rle["counts"]), (height, width), (0, 0, width, height))
    return np.ascontiguousarray(window)


def area_from_rle(rle: Mapping[str, Any]) -> int:
    """Upstream `area_from_rle`."""
    return int(np.sum(np.asarray(rle["counts"])[1::2], dtype=np.int64))


def coco_encode_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream `coco_encode_rle` (pycocotools' compressed RLE, counts as str)."""
    return encodings.encode_rle_counts(rle["counts"], rle["size"])


# --- the pipeline -------------------------------------------------------------------------


@dataclass
class MaskData:
    """Upstream's `MaskData` for one image, masks kept as RLE counts in the image frame.

    boxes: [n, 4] int64 XYXY (inclusive; crop frame inside `process_batch` output, image
    frame after `finish_crop`), iou_preds [n] float32, points [n, 2] float64 (x, y; crop
    frame, then image frame), stability_score [n] float32, crop_boxes [n, 4] int64 XYXY.
    """

    size: Size
    rles: list[np.ndarray]
    boxes: np.ndarray
    iou_preds: np.ndarray
    points: np.ndarray
    stability_score: np.ndarray
    crop_boxes: np.ndarray

    @classmethod
    def empty(cls, size: Size) -> MaskData:
        return cls(
            size=size,
            rles=[],
            boxes=np.zeros((0, 4), dtype=np.int64),
            iou_preds=np.zeros(0, dtype=np.float32),
            points=np.zeros((0, 2), dtype=np.float64),
            stability_score=np.zeros(0, dtype=np.float32),
            crop_boxes=np.zeros((0, 4), dtype=np.int64),
        )

    @classmethod
    def concatenate(cls, items: Sequence[MaskData], size: Size) -> MaskData:
        """Upstream `MaskData.cat`, in order."""
        items = [item for item in items if len(item)]
        if not items:
            return cls.empty(size)
        return cls(
            size=size,
            rles=[rle for item in items for rle in item.rles],
            boxes=np.concatenate([item.boxes for item in items]),
            iou_preds=np.concatenate([item.iou_preds for item in items]),
            points=np.concatenate([item.points for item in items]),
            stability_score=np.concatenate([item.stability_score for item in items]),
            crop_boxes=np.concatenate([item.crop_boxes for item in items]),
        )

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, indices: np.ndarray) -> MaskData:
        """Upstream `MaskData.filter` with an index tensor: select and reorder."""
        indices = np.asarray(indices, dtype=np.int64)
        return MaskData(
            size=self.size,
            rles=[self.rles[i] for i in indices],
            boxes=self.boxes[indices],
            iou_preds=self.iou_preds[indices],
            points=self.points[indices],
            stability_score=self.stability_score[indices],
            crop_boxes=self.crop_boxes[indices],
        )

    def mask(self, index: int) -> np.ndarray:
        """One whole-image boolean mask (decode only where it is needed)."""
        height, width = self.size
        return np.ascontiguousarray(
            rle_counts_window(self.rles[index], self.size, (0, 0, width, height))
        )


@dataclass(frozen=True, eq=False)
class CropJob:
    """One crop of the image and the grid points to prompt on it.

    box: XYXY in original pixels (x1, y1 exclusive); layer: its crop layer (0 = whole
    image); points: [n, 2] float64 (x, y) in crop pixels, upstream's `points_for_image`.
    """

    box: Box
    layer: int
    points: np.ndarray

    @property
    def size(self) -> Size:
        """(height, width) of the crop: the `original_size` of its encoder call."""
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The crop of an HxWxC image (a view), what upstream passes to `set_image`."""
        x0, y0, x1, y1 = self.box
        return image[y0:y1, x0:x1]

    def batches(self, points_per_batch: int) -> Iterator[np.ndarray]:
        """The points in decoder batches of points_per_batch, in upstream's order."""
        for (points,) in batch_iterator(points_per_batch, self.points):
            yield points


def crop_plan(original_size: Size, params: AmgParams, image_side: int = 1024) -> list[CropJob]:
    """Upstream's crops (`generate_crop_boxes`) with their point grids, in upstream's order.

    Crops whose resized size would have a zero side (only possible for images a few pixels
    wide) are left out: upstream fails on them in `set_image`.
    """
    height, width = original_size
    if height < 1 or width < 1:
        raise ValueError(f"cannot segment a {width}x{height} image")
    grids = build_all_layer_point_grids(
        params.points_per_side, params.crop_n_layers, params.crop_n_points_downscale_factor
    )
    crop_boxes, layer_idxs = generate_crop_boxes(
        original_size, params.crop_n_layers, params.crop_overlap_ratio
    )
    jobs = []
    for box, layer in zip(crop_boxes, layer_idxs, strict=True):
        x0, y0, x1, y1 = box
        crop_size = (y1 - y0, x1 - x0)
        if min(crop_size) < 1 or min(preprocess_shape(*crop_size, image_side)) < 1:
            continue
        points_scale = np.array(crop_size)[None, ::-1]
        jobs.append(CropJob((x0, y0, x1, y1), layer, grids[layer] * points_scale))
    return jobs


def decoder_inputs(
    points: np.ndarray, crop_size: Size, image_side: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder `point_coords` [P, 2, 2] and `point_labels` [P, 2] float32 for grid points.

    Each prompt is one foreground point mapped to the resized crop (`apply_coords`, float64,
    cast once) plus upstream's padding point (0, 0) labelled -1, which
    `PromptEncoder._embed_points` appends when there is no box: exactly what
    `SamPredictor.predict_torch` embeds in `_process_batch`.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    coords = np.zeros((len(points), 2, 2), dtype=np.float32)
    coords[:, 0] = apply_coords(points, crop_size, image_side)
    labels = np.empty((len(points), 2), dtype=np.float32)
    labels[:, 0] = FOREGROUND_LABEL
    labels[:, 1] = PADDING_LABEL
    return coords, labels


class Workspace:
    """Reused scratch planes for `process_batch`: the float32 logits of one mask at the crop's
    size, and boolean planes for its thresholded window.

    A full-resolution float mask is 4 bytes per pixel (48 MB at 12 MP); hundreds of masks go
    through these planes one after the other instead of being held together.
    """

    def __init__(self) -> None:
        self._logits = np.empty((0, 0), dtype=np.float32)
        self._bools: dict[str, np.ndarray] = {}

    def logits_plane(self, size: Size) -> np.ndarray:
        if self._logits.shape != tuple(size):
            self._logits = np.empty(size, dtype=np.float32)
        return self._logits

    def bool_plane(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A C-contiguous bool array of `shape`, backed by a buffer that only grows."""
        count = shape[0] * shape[1]
        buffer = self._bools.get(name)
        if buffer is None or buffer.size < count:
            buffer = self._bools[name] = np.empty(max(count, 1), dtype=bool)
        return buffer[:count].reshape(shape)


def logit_reach(
    low_res: np.ndarray, threshold: float, input_size: Size, output_size: Size, image_side: int
) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 of `postprocess_mask(low_res, ...)` outside which no
    logit exceeds threshold. Empty (0, 0, 0, 0) when none can.

    Each upsampled logit is a convex combination of the 2x2 nearest low-res logits (bilinear,
    twice), so it cannot exceed the largest of them. The bound takes every low-res logit above
    threshold minus a margin far larger than float rounding, and widens the reach of each
    resampling stage by a pixel or two: conservative, hence exact.
    """
    low_h, low_w = low_res.shape
    in_h, in_w = input_size
    out_h, out_w = output_size
    margin = 1e-3 + 1e-5 * float(np.abs(low_res).max(initial=0.0))
    active = low_res > threshold - margin
    rows = np.flatnonzero(active.any(axis=1))
    if len(rows) == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(active.any(axis=0))

    def reach(first: int, last: int, low_n: int, in_n: int, out_n: int) -> tuple[int, int]:
        factor = image_side / low_n  # low-res pixel -> resized-frame pixels
        start = max(0, math.floor((first - 1) * factor) - 1)
        stop = min(in_n, math.ceil((last + 2) * factor) + 1)
        scale = out_n / in_n  # resized frame -> output pixels
        return max(0, math.floor((start - 1) * scale) - 2), min(
            out_n, math.ceil((stop + 1) * scale) + 2
        )

    y0, y1 = reach(int(rows[0]), int(rows[-1]), low_h, in_h, out_h)
    x0, x1 = reach(int(cols[0]), int(cols[-1]), low_w, in_w, out_w)
    if y0 >= y1 or x0 >= x1:
        return 0, 0, 0, 0
    return y0, y1, x0, x1


def process_batch(
    low_res_masks: np.ndarray,
    iou_predictions: np.ndarray,
    points: np.ndarray,
    crop_box: Sequence[int],
    original_size: Size,
    params: AmgParams,
    *,
    image_side: int = 1024,
    input_size: Size | None = None,
    workspace: Workspace | None = None,
) -> MaskData:
    """Upstream `_process_batch` on the decoder's answer for one batch of grid points.

    low_res_masks [P, 4, 256, 256] and iou_predictions [P, 4] are the decoder outputs for
    `decoder_inputs(points, crop size, image_side)`; points [P, 2] are the batch's points in
    crop pixels; input_size is the crop's resized (h, w) (derived when omitted).

    Tokens 1..3; predicted-IoU filter (``> pred_iou_thresh`` when that is > 0); then per
    surviving mask: logits upsampled to the crop, stability score (``>=`` filter when the
    threshold is > 0), mask = logits > 0, its box, the near-crop-edge filter, and its RLE in
    the image frame. Order: point-major, token-minor, as upstream's `flatten(0, 1)`.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    orig_h, orig_w = original_size
    crop_size = (y1 - y0, x1 - x0)
    if input_size is None:
        input_size = preprocess_shape(*crop_size, image_side)
    masks, iou = postprocess.select_masks(low_res_masks, iou_predictions, multimask_output=True)
    n_tokens = masks.shape[1]
    iou_flat = np.asarray(iou, dtype=np.float32).reshape(-1)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) != masks.shape[0]:
        raise ValueError(f"{len(points)} points for {masks.shape[0]} decoder answers")

    candidates = np.arange(len(iou_flat))
    if params.pred_iou_thresh > 0.0:
        candidates = np.flatnonzero(iou_flat > np.float32(params.pred_iou_thresh))

    workspace = workspace or Workspace()
    logits = workspace.logits_plane(crop_size)
    threshold = np.float32(postprocess.MASK_THRESHOLD)
    high = np.float32(postprocess.MASK_THRESHOLD + params.stability_score_offset)
    low = np.float32(postprocess.MASK_THRESHOLD - params.stability_score_offset)
    stability_thresh = np.float32(params.stability_score_thresh)
    crop = np.array([x0, y0, x1, y1])
    image_box = np.array([0, 0, orig_w, orig_h])

    kept, rles, boxes, scores = [], [], [], []
    for index in candidates:
        prompt, token = divmod(int(index), n_tokens)
        low_res = masks[prompt, token]
        postprocess.postprocess_mask(low_res, input_size, crop_size, image_side, out=logits)
        # Every threshold below is >= low: only the window where logits can exceed low counts.
        wy0, wy1, wx0, wx1 = logit_reach(low_res, low, input_size, crop_size, image_side)
        window = logits[wy0:wy1, wx0:wx1]
        scratch = workspace.bool_plane("scratch", window.shape)
        intersections = np.float32(np.count_nonzero(np.greater(window, high, out=scratch)))
        unions = np.float32(np.count_nonzero(np.greater(window, low, out=scratch)))
        with np.errstate(invalid="ignore", divide="ignore"):
            stability = intersections / unions  # NaN for an empty union, as upstream
        if params.stability_score_thresh > 0.0 and not stability >= stability_thresh:
            continue
        mask = np.greater(window, threshold, out=workspace.bool_plane("mask", window.shape))
        local_box = postprocess.batched_mask_to_box(mask)
        box = local_box + np.array([wx0, wy0, wx0, wy0]) if mask.any() else local_box
        if is_box_near_crop_edge(box[None], crop, image_box, EDGE_TOLERANCE)[0]:
            continue
        kept.append(index)
        boxes.append(box)
        scores.append(stability)
        rles.append(mask_to_rle_counts(mask, original_size, (x0 + wx0, y0 + wy0), local_box))

    kept = np.asarray(kept, dtype=np.int64)
    return MaskData(
        size=(orig_h, orig_w),
        rles=rles,
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        iou_preds=iou_flat[kept],
        points=points[kept // n_tokens],
        stability_score=np.asarray(scores, dtype=np.float32),
        crop_boxes=np.tile(crop, (len(kept), 1)).astype(np.int64),
    )


def finish_crop(
    batches: Sequence[MaskData], crop_box: Sequence[int], params: AmgParams
) -> MaskData:
    """The end of upstream `_process_crop`: box NMS within the crop (by predicted IoU), then
    boxes and points back to the image frame."""
    if not batches:
        raise ValueError("finish_crop needs the process_batch results of at least one batch")
    data = MaskData.concatenate(batches, batches[0].size)
    keep = batched_nms(
        data.boxes.astype(np.float32),
        data.iou_preds,
        np.zeros(len(data), dtype=np.int64),
        params.box_nms_thresh,
    )
    data = data.take(keep)
    data.boxes = uncrop_boxes_xyxy(data.boxes, crop_box)
    data.points = uncrop_points(data.points, crop_box)
    data.crop_boxes = np.tile(np.asarray(crop_box, dtype=np.int64), (len(data), 1))
    return data


def merge_crops(crops: Sequence[MaskData], params: AmgParams, size: Size | None = None) -> MaskData:
    """The end of upstream `_generate_masks`: concatenate the crops and, when there is more
    than one crop, drop duplicates across crops by box NMS preferring smaller crops."""
    if size is None:
        if not crops:
            raise ValueError("merge_crops needs the image size when there are no crops")
        size = crops[0].size
    data = MaskData.concatenate(crops, size)
    if len(crops) > 1 and len(data):
        scores = np.float32(1) / box_area(data.crop_boxes).astype(np.float32)
        keep = batched_nms(
            data.boxes.astype(np.float32),
            scores,
            np.zeros(len(data), dtype=np.int64),
            params.crop_nms_thresh,
        )
        data = data.take(keep)
    return data


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
            new_boxes[index] = rle_counts_box(counts, data.size)
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
    box = rle_counts_box(counts, size)
    if len(counts) < 2:  # empty mask: whatever happens concerns the whole image
        return _clean_whole_image(counts, size, min_area)
    bx0, by0, bx1, by1 = (int(v) for v in box)
    wx0, wy0 = max(bx0 - 1, 0), max(by0 - 1, 0)
    wx1, wy1 = min(bx1 + 2, width), min(by1 + 2, height)
    window = np.ascontiguousarray(rle_counts_window(counts, size, (wx0, wy0, wx1, wy1)))

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
    return mask_to_rle_counts(window, size, (wx0, wy0), local_box), new_box


def _clean_whole_image(
    counts: np.ndarray, size: Size, min_area: int
) -> tuple[np.ndarray, np.ndarray] | None:
    height, width = size
    mask = np.ascontiguousarray(rle_counts_window(counts, size, (0, 0, width, height)))
    mask, holes_changed = remove_small_regions(mask, min_area, mode="holes")
    mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
    if not (holes_changed or islands_changed):
        return None
    box = postprocess.batched_mask_to_box(mask)
    return mask_to_rle_counts(mask, size, (0, 0), box), box


def to_records(data: MaskData, output_format: OutputFormat) -> list[dict[str, Any]]:
    """Upstream's records, in data order, with the mask encoded in output_format.

    segmentation, area, bbox [x, y, w, h], predicted_iou, point_coords [[x, y]],
    stability_score, crop_box [x, y, w, h]. RLE is encoded straight from the stored counts
    (pycocotools' compressed form, upstream's "coco_rle"); PNG and polygons decode one mask at
    a time. A NaN stability score (possible only with stability_score_thresh = 0 and a mask
    empty at every threshold) is reported as 0.0, JSON having no NaN.
    """
    return [record(data, index, output_format) for index in range(len(data))]


def record(data: MaskData, index: int, output_format: OutputFormat) -> dict[str, Any]:
    """Record `index` of `to_records`, to encode (or stream) one mask at a time."""
    height, width = data.size
    counts = data.rles[index]
    if output_format is OutputFormat.RLE:
        segmentation: Any = coco_encode_rle({"size": [height, width], "counts": counts})
    else:
        segmentation = encodings.encode_mask(data.mask(index), output_format)
    stability = float(data.stability_score[index])
    return {
        "segmentation": segmentation,
        "area": int(np.sum(counts[1::2], dtype=np.int64)),
        "bbox": postprocess.box_xyxy_to_xywh(data.boxes[index]).tolist(),
        "predicted_iou": float(data.iou_preds[index]),
        "point_coords": [data.points[index].tolist()],
        "stability_score": stability if math.isfinite(stability) else 0.0,
        "crop_box": postprocess.box_xyxy_to_xywh(data.crop_boxes[index]).tolist(),
    }


def generate_masks(
    original_size: Size,
    params: AmgParams,
    embed: Callable[[CropJob], Any],
    decode: Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    image_side: int = 1024,
) -> MaskData:
    """The whole of upstream `generate` up to the records, with the model as callbacks.

    embed(job) returns whatever decode needs for that crop (an embedding); decode(embedding,
    point_coords [P, 2, 2], point_labels [P, 2]) returns (low_res_masks [P, 4, 256, 256],
    iou_predictions [P, 4]).
    """
    workspace = Workspace()
    crops = []
    jobs = crop_plan(original_size, params, image_side)
    for job in jobs:
        embedding = embed(job)
        batches = []
        for points in job.batches(params.points_per_batch):
            coords, labels = decoder_inputs(points, job.size, image_side)
            low_res, iou = decode(embedding, coords, labels)
            batches.append(
                process_batch(
                    low_res,
                    iou,
                    points,
                    job.box,
                    original_size,
                    params,
                    image_side=image_side,
                    workspace=workspace,
                )
            )
        crops.append(finish_crop(batches, job.box, params))
    data = merge_crops(crops, params, original_size)
    if params.min_mask_region_area > 0:
        data = postprocess_small_regions(
            data,
            params.min_mask_region_area,
            max(params.box_nms_thresh, params.crop_nms_thresh),
        )
    return data
